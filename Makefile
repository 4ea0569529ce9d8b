# `make test` and `make bench` create/reuse a virtual environment in $(VENV) and install the
# project into it. Threads and the model hub are set for a small shared CPU machine.
VENV ?= .venv
PY := $(VENV)/bin/python
export OMP_WAIT_POLICY ?= PASSIVE
export HF_HUB_OFFLINE ?= 1

.PHONY: install test lint bench demo clean-venv

$(VENV)/.installed: requirements.txt pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $@

install: $(VENV)/.installed

test: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

# The main job on the embedded default: curves, DP / Lagrangian allocation, evaluation and the
# uniform baseline for the bundled digits models (CPU, no network); variables in the driver.
DEMO_OUT ?= runs/demo
demo: $(VENV)/.installed
	PY=$(abspath $(PY)) OUT=$(DEMO_OUT) bash scripts/run_digits_demo.sh

bench: $(VENV)/.installed
	$(PY) benchmarks/bench_rd_curves.py --archname deit_tiny_patch16_224 --random-init \
		--dataset synthetic --testsize 8 --nchannelbatch 64

clean-venv:
	rm -rf $(VENV)
