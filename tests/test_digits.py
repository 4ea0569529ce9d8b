"""The embedded digits default: fixed split, preprocessing, bundled weights and their checks."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from rdoq.adapters import digits
from rdoq.adapters.base import InputError, file_sha256
from rdoq.adapters.digits import (
    DIGITS_ARCHS,
    WEIGHTS_DIR,
    WEIGHTS_SHA256,
    build_digits_model,
    bundled_weights,
    digits_accuracy,
    digits_calib,
    digits_eval,
    digits_split,
    preprocess,
    save_weights,
    train_digits_model,
)
from tests.conftest import run_script


@pytest.fixture(scope="module")
def raw() -> tuple[np.ndarray, np.ndarray]:
    return digits._load_raw()


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_split_is_fixed_stratified_and_disjoint(raw):
    _, labels = raw
    train, test = digits_split()
    assert (len(train), len(test)) == (1257, 540)
    assert np.intersect1d(train, test).size == 0
    assert np.array_equal(np.sort(np.concatenate([train, test])), np.arange(len(labels)))
    assert np.all(np.diff(train) > 0) and np.all(np.diff(test) > 0)
    train2, test2 = digits_split()
    assert np.array_equal(train, train2) and np.array_equal(test, test2)
    # Stratified: every class keeps its share of the test split to within one image.
    for c in range(10):
        n_c = int((labels == c).sum())
        assert abs(int((labels[test] == c).sum()) - 0.3 * n_c) <= 1


def test_preprocess_shapes_values_and_constants(raw):
    images, _ = raw
    x = preprocess(images[:5])
    assert x.shape == (5, 1, 16, 16) and x.dtype == torch.float32
    flat = preprocess(np.full((2, 8, 8), 16.0))  # all-white → (1 - MEAN) / STD everywhere
    assert torch.allclose(flat, torch.full_like(flat, (1 - digits.MEAN) / digits.STD))
    assert torch.allclose(
        preprocess(np.zeros((1, 8, 8))), torch.full((1, 1, 16, 16), -digits.MEAN / digits.STD)
    )
    # The hard-coded constants really normalise the train split.
    train, _ = digits_split()
    xt = preprocess(images[train])
    assert abs(float(xt.mean())) < 0.05 and abs(float(xt.std()) - 1) < 0.05


def test_calib_from_train_class_spread_and_reproducible(raw):
    images, labels = raw
    train, test = digits_split()
    calib = digits_calib(25, seed=3)
    assert calib.x.shape == (25, 1, 16, 16) and calib.x.dtype == torch.float32
    assert calib.source == "digits:train" and calib.seed == 3
    assert set(calib.items) <= set(train.tolist()) and not set(calib.items) & set(test.tolist())
    counts = np.bincount(labels[calib.items], minlength=10)
    assert counts.max() - counts.min() <= 1 and counts.sum() == 25
    assert torch.equal(calib.x, preprocess(images[calib.items]))
    # Round-robin over classes 0..9, the lowest unused train index of each class per round.
    per_class = [sorted(i for i in train.tolist() if labels[i] == c) for c in range(10)]
    assert calib.items == [per_class[c][r] for r in range(3) for c in range(10)][:25]
    big = digits_calib(300)
    assert np.array_equal(np.bincount(labels[big.items], minlength=10), np.full(10, 30))
    again = digits_calib(25)
    assert again.items == calib.items and torch.equal(again.x, calib.x)
    assert calib.meta()["size"] == 25 and calib.meta()["items"] == calib.items
    assert len(digits_calib(len(train)).items) == len(train)


@pytest.mark.parametrize("count", [0, -1, 1258])
def test_calib_size_errors_name_the_max(count):
    with pytest.raises(InputError, match="1257"):
        digits_calib(count)


def test_eval_is_the_test_split(raw):
    _, labels = raw
    _, test = digits_split()
    x, y = digits_eval()
    assert x.shape == (540, 1, 16, 16) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and torch.equal(y, torch.as_tensor(labels[test]))
    xs, ys = digits_eval(20)
    assert xs.shape == (20, 1, 16, 16)
    assert torch.equal(torch.bincount(ys, minlength=10), torch.full((10,), 2))
    for bad in (0, -2, 541):
        with pytest.raises(InputError, match="540"):
            digits_eval(bad)


@pytest.mark.parametrize("name", DIGITS_ARCHS)
def test_bundled_model_passes_sha_check_and_is_accurate(name):
    path = WEIGHTS_DIR / f"{name}.pt"
    assert file_sha256(path) == WEIGHTS_SHA256[name]
    assert path.stat().st_size < 1 << 20
    model, info = build_digits_model(name)
    assert not model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert (info.arch, info.weights_source, info.checkpoint_sha256) == (
        name,
        f"bundled:{name}.pt",
        WEIGHTS_SHA256[name],
    )
    x, y = digits_eval()
    assert digits_accuracy(model, x, y) >= 0.97


def test_tampered_weights_are_refused(tmp_path):
    name = "digits_cnn"
    shutil.copy(WEIGHTS_DIR / f"{name}.pt", tmp_path / f"{name}.pt")
    assert bundled_weights(name, tmp_path).keys() == bundled_weights(name).keys()
    data = bytearray((tmp_path / f"{name}.pt").read_bytes())
    data[len(data) // 2] ^= 0x01
    (tmp_path / f"{name}.pt").write_bytes(bytes(data))
    with pytest.raises(InputError) as err:
        bundled_weights(name, tmp_path)
    msg = str(err.value)
    assert str(tmp_path / f"{name}.pt") in msg and WEIGHTS_SHA256[name] in msg
    assert file_sha256(tmp_path / f"{name}.pt") in msg and "train_digits.py" in msg
    with pytest.raises(InputError, match="missing"):
        bundled_weights("digits_vit", tmp_path)


def test_unknown_arch_lists_the_valid_names():
    with pytest.raises(InputError) as err:
        build_digits_model("digits_mlp")
    assert "digits_mlp" in str(err.value)
    assert all(name in str(err.value) for name in DIGITS_ARCHS)


def test_random_init_is_seeded_and_differs_from_bundled():
    bundled, _ = build_digits_model("digits_cnn")
    rand0, info = build_digits_model("digits_cnn", random_init=True, seed=0)
    assert info.weights_source == "random-init:seed=0" and info.checkpoint_sha256 is None
    assert not rand0.training
    assert not same_weights(rand0, bundled)
    assert same_weights(rand0, build_digits_model("digits_cnn", random_init=True, seed=0)[0])
    assert not same_weights(rand0, build_digits_model("digits_cnn", random_init=True, seed=1)[0])


def test_checkpoint_round_trip_and_mismatch(tmp_path):
    model, _ = build_digits_model("digits_vit", random_init=True, seed=5)
    path = tmp_path / "mine.pt"
    sha = save_weights(model, path)
    # Bytes do not depend on the file name (the hashes printed by the script stay valid).
    assert save_weights(model, tmp_path / "other.pt") == sha
    loaded, info = build_digits_model("digits_vit", checkpoint=path)
    assert same_weights(loaded, model)
    assert (info.weights_source, info.checkpoint_sha256) == ("checkpoint:mine.pt", sha)
    with pytest.raises(InputError, match="does not fit digits_cnn"):
        build_digits_model("digits_cnn", checkpoint=path)


def test_training_is_reproducible_in_process():
    a, acc_a = train_digits_model("digits_cnn", epochs=1, seed=0)
    b, acc_b = train_digits_model("digits_cnn", epochs=1, seed=0)
    assert same_weights(a, b) and acc_a == acc_b
    assert not a.training and 0.1 < acc_a <= 1.0


@pytest.mark.slow
def test_train_script_writes_only_its_outdir(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    proc = run_script(
        "classification/train_digits.py",
        "--archname",
        "digits_cnn",
        "--epochs",
        "1",
        "--outdir",
        str(out),
        cwd=tmp_path,
    )
    (result,) = [json.loads(line) for line in proc.stdout.splitlines()]
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["digits_cnn.pt", "out"]
    assert result["sha256"] == file_sha256(out / "digits_cnn.pt")
    assert result["archname"] == "digits_cnn" and 0 <= result["test_acc"] <= 1
    model, _ = build_digits_model("digits_cnn", checkpoint=out / "digits_cnn.pt")
    x, y = digits_eval()
    assert digits_accuracy(model, x, y) == pytest.approx(result["test_acc"], abs=1e-4)
