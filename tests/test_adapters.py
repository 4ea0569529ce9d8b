"""The adapter interface (rdoq.adapters.base.Adapter): every registered adapter implements it,
the registry is what --dataset offers, and an adapter the CLI has never heard of runs through the
curve and allocation entry points when it is passed in."""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from rdoq import cli, cli_alloc, cli_curves
from rdoq.adapters import adapter_registry, get_adapter
from rdoq.adapters.base import Adapter, CalibSet, InputError, ModelInfo
from rdoq.evaluate import TensorBatches, reference_outputs
from rdoq.groups import channel_dim, find_layers

BUILT_IN = ("imagenet", "digits", "synthetic", "natural")
INTERFACE = (
    "build",
    "example_input",
    "calib",
    "eval_data",
    "run",
    "evaluate",
    "layers",
    "channel_axis",
)


def make_imagefolder(root: Path) -> Path:
    """Two classes of two 40×40 images in train/ and val/."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in ("n01", "n02"):
            (root / split / c).mkdir(parents=True)
            for i in range(2):
                img = rng.integers(0, 256, size=(40, 40, 3), dtype=np.uint8)
                Image.fromarray(img).save(root / split / c / f"{i}.png")
    return root


def flags(name: str, tmp_path: Path) -> argparse.Namespace:
    """The flags an adapter reads, with a model each that builds offline in a second."""
    model = (
        {"archname": "digits_cnn", "random_init": False}
        if name == "digits"
        else {"archname": "test_resnet", "random_init": True}
    )
    datapath = make_imagefolder(tmp_path / "imagenet") if name == "imagenet" else tmp_path
    return argparse.Namespace(
        dataset=name,
        checkpoint=None,
        seed=0,
        testsize=3,
        batchsize=2,
        workers=0,
        datapath=datapath,
        fold_bn=False,
        **model,
    )


def test_registry_is_fresh_and_keyed_by_name():
    first = adapter_registry()
    assert tuple(first) == BUILT_IN
    assert all(a.name == name for name, a in first.items())
    first.pop("digits")
    assert "digits" in adapter_registry()  # a caller's change never leaks into the next one


def test_registry_names_are_the_dataset_choices(capsys):
    p = argparse.ArgumentParser()
    cli.add_model_flags(p.add_argument_group("model"))
    action = next(a for a in p._actions if a.dest == "dataset")
    assert tuple(action.choices) == tuple(adapter_registry())
    with pytest.raises(SystemExit):
        cli_curves.curves_main("weight", None, ["--dataset", "nope"])
    err = capsys.readouterr().err
    # (argparse quotes the choices in some Python versions and not in others)
    assert "invalid choice" in err and all(n in err.split("choose from")[1] for n in BUILT_IN)


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(
        InputError,
        match="--dataset 'nope' has no adapter; choose one of imagenet, digits, synthetic, natural",
    ):
        get_adapter("nope")


@pytest.mark.parametrize("name", BUILT_IN)
def test_every_registered_adapter_satisfies_the_interface(name, tmp_path):
    if name == "natural" and importlib.util.find_spec("skimage") is None:
        pytest.skip("scikit-image ships the sample images: pip install -e .[real]")
    adapter = get_adapter(name)
    assert isinstance(adapter, Adapter) and not type(adapter).__abstractmethods__
    for method in INTERFACE:  # overrides keep the interface's parameters
        assert (
            list(inspect.signature(getattr(adapter, method)).parameters)
            == list(inspect.signature(getattr(Adapter, method)).parameters)[1:]
        ), method
    args = flags(name, tmp_path)
    model, info = adapter.build(args)
    assert isinstance(model, nn.Module) and not model.training and isinstance(info, ModelInfo)
    calib = adapter.calib(args, model, 2, 5)
    assert isinstance(calib, CalibSet) and calib.x.shape[0] == 2 and calib.seed == 5
    # The same flags give the same tensor: curve sets record its sha256 and check it on resume.
    assert calib.meta()["sha256"] == adapter.calib(args, model, 2, 5).meta()["sha256"]
    example = adapter.example_input(model, 2, 0)
    assert example.shape == calib.x.shape
    batches = list(adapter.eval_data(args, model))
    assert sum(len(x) for x, _ in batches) == 3 and len(batches[0][0]) == 2
    x = batches[0][0]
    with torch.no_grad():
        assert torch.equal(adapter.run(model, x), model(x))
    layers = adapter.layers(model)
    assert layers == find_layers(model)
    modules = dict(model.named_modules())
    assert all(
        adapter.channel_axis(modules[la.name]) == channel_dim(modules[la.name]) for la in layers
    )
    cpu = torch.device("cpu")
    ref, _ = reference_outputs(model, batches, cpu, adapter.run)  # (3, K)
    metrics = adapter.evaluate(model, batches, ref, cpu)
    assert metrics["out_mse"] == 0 and metrics["n_eval"] == 3


class TinyNet(nn.Module):
    """A conv and a linear layer on 1×6×6 inputs, 3 classes."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv(x))  # (N, 8, 6, 6)
        return self.head(x.mean((2, 3)))  # (N, 3)


class BlobsAdapter(Adapter):
    """A third family the CLI does not know: seeded noise images labelled by their mean's sign."""

    name = "blobs"

    def __init__(self) -> None:
        self.runs = 0  # forwards through ``run``: shows the evaluation goes through the adapter

    def build(self, args: argparse.Namespace) -> tuple[nn.Module, ModelInfo]:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(args.seed)
            return TinyNet().eval(), ModelInfo(args.archname, f"random-init:seed={args.seed}")

    def example_input(self, model: nn.Module, count: int, seed: int) -> torch.Tensor:
        return torch.randn(count, 1, 6, 6, generator=torch.Generator().manual_seed(seed))

    def calib(self, args: argparse.Namespace, model: nn.Module, size: int, seed: int) -> CalibSet:
        return CalibSet(
            self.example_input(model, size, seed), "blobs:randn", list(range(size)), seed
        )

    def eval_data(self, args: argparse.Namespace, model: nn.Module) -> TensorBatches:
        x = self.example_input(model, args.testsize, 99)  # (N, 1, 6, 6)
        return TensorBatches(x, (x.mean((1, 2, 3)) > 0).long(), args.batchsize, "blobs:test")

    def run(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        self.runs += 1
        return model(x)


def test_a_new_adapter_runs_through_the_entry_points_without_cli_changes(tmp_path):
    blobs = BlobsAdapter()
    adapters = {**adapter_registry(), blobs.name: blobs}
    model = ["--archname", "blobs_net", "--dataset", "blobs", "--device", "cpu", "--quiet"]
    summary = cli_curves.curves_main(
        "weight",
        None,
        [
            *model,
            "--testsize",
            "4",
            "--nchannelbatch",
            "4",
            "--maxrates",
            "3",
            "--maxsteps",
            "4",
            "--maxdeadzones",
            "1",
            "--outdir",
            str(tmp_path),
        ],
        adapters=adapters,
    )
    root = Path(summary["curve_set"])
    meta = json.loads((root / "meta.json").read_text())
    assert meta["model"] == "blobs_net" and meta["calib"]["source"] == "blobs:randn"
    assert summary["layers_written"] == 2  # conv and head
    out = tmp_path / "dp"
    # -bcw rebuilds the calibration through the adapter and checks it against the curves' sha256.
    result = cli_alloc.allocate_main(
        "dp",
        argv=[
            *model,
            "--pathrdcurve",
            str(root),
            "--weights-only",
            "--target_rates",
            "1.5",
            "--testsize",
            "8",
            "--batchsize",
            "4",
            "-bcw",
            "--no-plots",
            "--outdir",
            str(out),
        ],
        adapters=adapters,
    )
    (row,) = result["rows"]
    assert row["model"] == "blobs_net" and row["n_eval"] == 8 and row["top1"] is not None
    assert blobs.runs == 2 * 2  # reference and quantized outputs, two batches each
    # Without the registry that holds it, --dataset blobs is refused by argparse.
    with pytest.raises(SystemExit):
        cli_curves.curves_main("weight", None, [*model, "--outdir", str(tmp_path / "x")])
