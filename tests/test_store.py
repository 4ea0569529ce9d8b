"""The curve store (DESIGN §5): round trip, schema, resume/refuse, atomic writes, validation,
paper directory names."""

import copy
import json

import numpy as np
import pytest

from rdoq.store import SCHEMA, CurveStore, LayerCurves, atomic_write_json, curve_set_name

SHA_A = "a1" * 32
SHA_B = "b2" * 32


def _meta(**over):
    meta = {
        "kind": "weight",
        "estimator": "measured",
        "model": "test_resnet",
        "checkpoint_sha256": None,
        "weights_source": "random",
        "group_size": 32,
        "bits": list(range(9)),
        "ndz": 3,
        "step_grid": 1,
        "max_steps": 16,
        "calib": {
            "size": 8,
            "seed": 0,
            "source": "synthetic:randn",
            "sha256": SHA_A,
            "items": list(range(8)),
        },
        "layers": [
            {"name": "conv1", "type": "Conv2d", "shape": [64, 3, 3, 3], "groups": 2, "numel": 1728},
            {"name": "fc", "type": "Linear", "shape": [70, 64], "groups": 3, "numel": 4480},
        ],
        "argv": ["rdcurves.py", "--nchannelbatch", "32"],
        "created": "2025-01-01T00:00:00",
    }
    meta.update(over)
    return meta


def _curves(groups, d=3, b=9, seed=0):
    rng = np.random.default_rng(seed)
    dist = np.sort(rng.random((groups, d, b)), axis=-1)[..., ::-1].copy()  # (G, D, B)
    step = rng.integers(-10, 0, (groups, d, b)).astype(np.float64)  # (G, D, B)
    step[..., 0] = np.nan
    dz = np.broadcast_to(np.array([0.0, 0.01, 0.02])[None, :d, None], (groups, d, b)).copy()
    numel = np.full(groups, 32 * 27, dtype=np.int64)
    return LayerCurves(dist, step, dz, numel, extra={"rms": rng.random(groups)})


def _assert_curves_equal(a, b):
    for key in ("dist", "step_log2", "deadzone", "numel"):
        np.testing.assert_array_equal(getattr(a, key), getattr(b, key))
        assert getattr(a, key).dtype == getattr(b, key).dtype
    assert a.extra.keys() == b.extra.keys()
    for key in a.extra:
        np.testing.assert_array_equal(a.extra[key], b.extra[key])


def _no_temp_files(directory):
    return [p.name for p in directory.iterdir() if p.name.endswith(".tmp")] == []


# ---------------------------------------------------------------------------------------------
# round trip, schema, resume


def test_round_trip(tmp_path):
    root = tmp_path / "curves"
    store = CurveStore.open(root, _meta())
    c = _curves(2)
    store.write_layer("conv1", c)

    loaded = CurveStore.load(root)
    assert loaded.layer_names() == ["conv1", "fc"]
    _assert_curves_equal(loaded.read_layer("conv1"), c)
    assert (root / "layers" / "conv1.npz").is_file()
    assert _no_temp_files(root / "layers")


def test_meta_json_schema(tmp_path):
    root = tmp_path / "curves"
    CurveStore.open(root, _meta())
    meta = json.loads((root / "meta.json").read_text())
    assert meta["schema"] == "rdoq.curves/2" == SCHEMA
    assert meta["group_size"] == 32
    assert meta["calib"]["sha256"] == SHA_A
    assert [x["name"] for x in meta["layers"]] == ["conv1", "fc"]
    assert CurveStore.read_meta(root) == meta
    assert _no_temp_files(root)


def test_reopen_same_meta_resumes(tmp_path):
    root = tmp_path / "curves"
    store = CurveStore.open(root, _meta())
    assert store.missing_layers() == ["conv1", "fc"]
    assert not store.has_layer("conv1")
    store.write_layer("conv1", _curves(2))

    # argv/created describe one invocation and may differ
    again = CurveStore.open(root, _meta(argv=["other"], created="2025-02-02T00:00:00"))
    assert again.has_layer("conv1")
    assert not again.has_layer("fc")
    assert again.missing_layers() == ["fc"]
    _assert_curves_equal(again.read_layer("conv1"), _curves(2))
    again.write_layer("fc", _curves(3, seed=1))
    assert CurveStore.load(root).missing_layers() == []


def test_reopen_accepts_tuples_for_lists(tmp_path):
    root = tmp_path / "curves"
    CurveStore.open(root, _meta())
    CurveStore.open(root, _meta(bits=tuple(range(9))))


def test_reopen_with_other_group_size_refused(tmp_path):
    root = tmp_path / "curves"
    CurveStore.open(root, _meta(group_size=32))
    before = (root / "meta.json").read_text()
    with pytest.raises(ValueError) as err:
        CurveStore.open(root, _meta(group_size=64))
    msg = str(err.value)
    assert "group_size" in msg and "32" in msg and "64" in msg
    assert (root / "meta.json").read_text() == before


@pytest.mark.parametrize(
    "key, a, b",
    [
        ("bias_corr", False, True),
        ("steps", "group", "channel"),
        ("scales_log2", [0.0], [0.0, -0.25]),
    ],
)
def test_reopen_with_other_quantizer_settings_refused(tmp_path, key, a, b):
    # Curves measured with and without -bcw, or with other step rules, share a directory name:
    # a resume must never mix their layer files.
    root = tmp_path / "curves"
    CurveStore.open(root, _meta(**{key: a}))
    with pytest.raises(ValueError, match=key):
        CurveStore.open(root, _meta(**{key: b}))


def test_reopen_with_other_calibration_refused(tmp_path):
    root = tmp_path / "curves"
    CurveStore.open(root, _meta())
    other = _meta()
    other["calib"] = dict(other["calib"], sha256=SHA_B)
    with pytest.raises(ValueError) as err:
        CurveStore.open(root, other)
    msg = str(err.value)
    assert "calib" in msg
    assert SHA_A[:16] in msg and SHA_B[:16] in msg


@pytest.mark.parametrize(
    "key,value",
    [
        ("bits", list(range(5))),
        ("ndz", 1),
        ("step_grid", 4),
        ("kind", "act"),
        ("model", "deit"),
        ("estimator", "hessian"),
        ("checkpoint_sha256", SHA_B),
        ("max_steps", 20),
    ],
)
def test_reopen_with_other_setting_names_it(tmp_path, key, value):
    root = tmp_path / "curves"
    CurveStore.open(root, _meta())
    with pytest.raises(ValueError, match=key):
        CurveStore.open(root, _meta(**{key: value}))


def test_reopen_with_other_layers_refused(tmp_path):
    root = tmp_path / "curves"
    CurveStore.open(root, _meta())
    other = _meta()
    other["layers"] = copy.deepcopy(other["layers"])
    other["layers"][1]["shape"] = [71, 64]
    with pytest.raises(ValueError, match="layers"):
        CurveStore.open(root, other)


# ---------------------------------------------------------------------------------------------
# atomic writes


def test_failed_layer_write_leaves_no_file(tmp_path, monkeypatch):
    store = CurveStore.open(tmp_path / "curves", _meta())

    def broken_savez(f, **arrays):
        f.write(b"PK\x03\x04 partial bytes")
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", broken_savez)
    with pytest.raises(OSError, match="disk full"):
        store.write_layer("conv1", _curves(2))
    layers = tmp_path / "curves" / "layers"
    assert not store.has_layer("conv1")
    assert list(layers.iterdir()) == []


def test_failed_overwrite_keeps_previous_file(tmp_path, monkeypatch):
    store = CurveStore.open(tmp_path / "curves", _meta())
    good = _curves(2, seed=5)
    store.write_layer("conv1", good)
    path = store.layer_path("conv1")
    before = path.read_bytes()

    def broken_savez(f, **arrays):
        f.write(b"garbage" * 100)
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "savez", broken_savez)
    with pytest.raises(KeyboardInterrupt):
        store.write_layer("conv1", _curves(2, seed=6))
    monkeypatch.undo()

    assert path.read_bytes() == before
    assert [p.name for p in path.parent.iterdir()] == ["conv1.npz"]
    _assert_curves_equal(store.read_layer("conv1"), good)


def test_failed_json_write_keeps_previous_file(tmp_path):
    path = tmp_path / "x.json"
    atomic_write_json(path, {"a": 1})

    class Unserializable:
        pass

    with pytest.raises(TypeError):
        atomic_write_json(path, {"a": Unserializable()})
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


# ---------------------------------------------------------------------------------------------
# validation on read and write


def test_read_missing_layer_names_it(tmp_path):
    store = CurveStore.open(tmp_path / "curves", _meta())
    with pytest.raises(FileNotFoundError, match="fc"):
        store.read_layer("fc")


def _write_raw(store, name, **arrays):
    """A layer file bypassing write_layer's checks, stamped with the store's settings."""
    path = store.layer_path(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, settings_digest=np.array(store.settings_digest), **arrays)


def test_layer_files_of_other_settings_are_not_reused(tmp_path):
    root = tmp_path / "curves"
    store = CurveStore.open(root, _meta())
    store.write_layer("conv1", _curves(2))
    assert store.has_layer("conv1")
    (root / "meta.json").unlink()  # someone replaced meta.json, left layers/ behind
    other = CurveStore.open(root, {**_meta(), "max_steps": 99})
    assert not other.has_layer("conv1")
    assert other.missing_layers()[0] == "conv1"
    with pytest.raises(ValueError, match="other settings"):
        other.read_layer("conv1")


def test_read_layer_with_wrong_shapes_refused(tmp_path):
    store = CurveStore.open(tmp_path / "curves", _meta())
    c = _curves(2)
    _write_raw(
        store,
        "conv1",
        dist=c.dist,
        step_log2=c.step_log2[:, :, :-1],
        deadzone=c.deadzone,
        numel=c.numel,
    )
    with pytest.raises(ValueError, match="step_log2"):
        store.read_layer("conv1")
    _write_raw(
        store, "conv1", dist=c.dist, step_log2=c.step_log2, deadzone=c.deadzone, numel=np.ones(3)
    )
    with pytest.raises(ValueError, match="numel"):
        store.read_layer("conv1")


def test_read_layer_with_wrong_group_count_refused(tmp_path):
    store = CurveStore.open(tmp_path / "curves", _meta())
    c = _curves(3)  # meta.json says conv1 has 2 groups
    _write_raw(
        store, "conv1", dist=c.dist, step_log2=c.step_log2, deadzone=c.deadzone, numel=c.numel
    )
    with pytest.raises(ValueError, match="groups"):
        store.read_layer("conv1")


def test_read_layer_with_missing_array_refused(tmp_path):
    store = CurveStore.open(tmp_path / "curves", _meta())
    c = _curves(2)
    _write_raw(store, "conv1", dist=c.dist, step_log2=c.step_log2, numel=c.numel)
    with pytest.raises(ValueError, match="deadzone"):
        store.read_layer("conv1")


def test_nan_dist_refused(tmp_path):
    store = CurveStore.open(tmp_path / "curves", _meta())
    c = _curves(2)
    c.dist[1, 0, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        store.write_layer("conv1", c)
    assert not store.has_layer("conv1")
    _write_raw(
        store, "conv1", dist=c.dist, step_log2=c.step_log2, deadzone=c.deadzone, numel=c.numel
    )
    with pytest.raises(ValueError, match="NaN"):
        store.read_layer("conv1")


def test_write_layer_with_wrong_shapes_refused(tmp_path):
    store = CurveStore.open(tmp_path / "curves", _meta())
    c = _curves(2)
    c.deadzone = c.deadzone[:, :1]
    with pytest.raises(ValueError, match="deadzone"):
        store.write_layer("conv1", c)
    assert not store.has_layer("conv1")


def test_pickled_object_array_refused(tmp_path):
    store = CurveStore.open(tmp_path / "curves", _meta())
    c = _curves(2)
    obj = np.empty(2, dtype=object)
    obj[0], obj[1] = {"evil": 1}, [1, 2]
    _write_raw(
        store,
        "conv1",
        dist=c.dist,
        step_log2=c.step_log2,
        deadzone=c.deadzone,
        numel=c.numel,
        payload=obj,
    )
    with pytest.raises(ValueError, match="allow_pickle"):
        store.read_layer("conv1")


def test_layer_names_with_slash_rejected(tmp_path):
    store = CurveStore.open(tmp_path / "curves", _meta())
    for name in ("../evil", "a/b", "/abs", ".hidden"):
        with pytest.raises(ValueError):
            store.write_layer(name, _curves(2))
        with pytest.raises(ValueError):
            store.read_layer(name)
        with pytest.raises(ValueError):
            store.has_layer(name)
    assert not (tmp_path / "evil.npz").exists()
    assert sorted(p.name for p in tmp_path.rglob("*.npz")) == []


@pytest.mark.parametrize("damage", ["truncate", "empty", "garbage", "flip"])
def test_unreadable_layer_file_is_named_and_counts_as_missing(tmp_path, damage):
    # A disk that filled up or a copy that stopped half way leaves a damaged layer file: reading
    # it names the file and the fix; a resuming curve run treats it as missing and recomputes it.
    store = CurveStore.open(tmp_path / "curves", _meta())
    store.write_layer("conv1", _curves(2))
    store.write_layer("fc", _curves(3, seed=1))
    path = store.layer_path("conv1")
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "garbage":
        path.write_bytes(b"not a zip file at all" * 10)
    else:  # one flipped byte inside the stored dist array: only the CRC check can tell
        i = data.index(b"dist.npy") + 200
        path.write_bytes(data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1 :])
    assert not store.has_layer("conv1")
    assert store.missing_layers() == ["conv1"]
    assert store.has_layer("fc")
    with pytest.raises(ValueError) as err:
        store.read_layer("conv1")
    msg = str(err.value)
    assert str(path) in msg and "re-run the curve script" in msg, msg
    assert "\n" not in msg
    store.write_layer("conv1", _curves(2))  # what the resumed run does: overwrite it
    _assert_curves_equal(store.read_layer("conv1"), _curves(2))
    assert _no_temp_files(path.parent)


# ---------------------------------------------------------------------------------------------
# meta.json validation


def test_read_meta_missing_dir(tmp_path):
    with pytest.raises(FileNotFoundError):
        CurveStore.load(tmp_path / "nothing")


@pytest.mark.parametrize(
    "text",
    [
        "{not json",
        "",
        "[1, 2]",
        json.dumps({**_meta(), "schema": "rdoq.curves/0"}),
        json.dumps(_meta()),  # no schema at all
        json.dumps(
            {"schema": SCHEMA, "kind": "weight", "bits": [0, 1], "layers": []}
        ),  # group_size
    ],
)
def test_read_meta_rejects_bad_files(tmp_path, text):
    (tmp_path / "meta.json").write_text(text)
    with pytest.raises(ValueError):
        CurveStore.read_meta(tmp_path)
    with pytest.raises(ValueError):
        CurveStore.open(tmp_path, _meta())


def test_read_meta_bad_schema_names_it(tmp_path):
    (tmp_path / "meta.json").write_text(json.dumps({**_meta(), "schema": "rdoq.curves/0"}))
    with pytest.raises(ValueError, match="rdoq.curves/0"):
        CurveStore.load(tmp_path)


# ---------------------------------------------------------------------------------------------
# paper directory names


def test_curve_set_name_weights():
    assert curve_set_name("deit_base_patch16_224", "weight", ndz=10, nr=11, ns=64, nf=128) == (
        "deit_base_patch16_224_ndz_0010_nr_0011_ns_0064_nf_0128_rdcurves_channelwise_opt_dist"
    )


def test_curve_set_name_activations():
    assert curve_set_name(
        "deit_base_patch16_224", "act", ndz=10, nr=11, ns=64, nf=128, act_mode="out"
    ) == ("deit_base_patch16_224_nr_0011_ns_0064_nf_0128_rdcurves_out_channelwise_opt_dist_act")
    assert curve_set_name(
        "deit_base_patch16_224", "act", ndz=10, nr=11, ns=64, nf=128, act_mode="in"
    ) == ("deit_base_patch16_224_nr_0011_ns_0064_nf_0128_rdcurves_channelwise_opt_dist_act")


def test_curve_set_name_bad_kind():
    with pytest.raises(ValueError, match="bias"):
        curve_set_name("resnet18", "bias", 1, 2, 3, 4)


def test_atomic_writes_get_the_usual_file_mode(tmp_path):
    import os

    from rdoq.store import atomic_write_json

    old = os.umask(0o022)
    try:
        atomic_write_json(tmp_path / "x.json", {"a": 1})
    finally:
        os.umask(old)
    assert (tmp_path / "x.json").stat().st_mode & 0o777 == 0o644
