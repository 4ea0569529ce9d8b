"""The curve store: one directory per curve set, ``meta.json`` + ``layers/<name>.npz`` (DESIGN §5).

Every file is written atomically (temp file in the same directory + ``os.replace``), so a killed
run leaves either a finished layer file or none. A re-run with the same settings skips finished
layers; a re-run with different settings into the same directory is refused. Opening a curve
set for allocation checks it is complete and of the expected kind (:func:`open_curve_set`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import zipfile
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from rdoq.authors import curve_rules_of

SCHEMA = "rdoq.curves/2"
# Curve sets with an optional setting (OPTIONAL_SETTINGS_KEYS): weight channels sorted before
# grouping (--sort_channels: meta.json's ``sort_channels``, each layer's ``channel_order``),
# input-channel weight groups (--group-axis in: ``group_axis``) or the authors' rules
# (--authors-semantics: ``authors_semantics``). A reader that ignored them
# would apply groups to the wrong channels or with the wrong quantizer, so such sets carry a
# version older readers refuse.
SCHEMA_V3 = "rdoq.curves/3"
# Settings absent from sets that do not use them (which so keep their settings digests).
OPTIONAL_SETTINGS_KEYS = ("sort_channels", "authors_semantics", "group_axis")
# Keys of meta.json that describe *how* curves were made; two runs may share a directory only if
# all of them agree. ``argv``/``created``/``part`` describe one invocation and may differ.
SETTINGS_KEYS = (
    "schema",
    "kind",
    "estimator",
    "act_mode",
    "model",
    "checkpoint_sha256",
    "weights_source",
    "group_size",
    "bits",
    "ndz",
    "step_grid",
    "max_steps",
    "precision",
    "calib",
    "layers",
    "estimator_params",
    "steps",
    "scales_log2",
    "bias_corr",
    "folds",
)
LAYER_ARRAYS = ("dist", "step_log2", "deadzone", "numel")
# What reading a damaged .npz raises (a copy or a full disk that stopped half way, flipped bytes):
# numpy and zipfile report it as any of these.
DAMAGED_FILE_ERRORS = (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile, zlib.error)

log = logging.getLogger("rdoq")


def curve_set_name(
    arch: str,
    kind: str,
    ndz: int,
    nr: int,
    ns: int,
    nf: int,
    act_mode: str | None = None,
    sort: str | None = None,
    authors: Sequence[str] = (),
    group_axis: str = "out",
) -> str:
    """The paper's directory name for a curve set (a label only; the truth is in meta.json).
    Sorted weight curves (``sort``, the statistic of ``--sort_channels``) get ``_sort<stat>``
    after the group size, and curves with the authors' rules (``authors``, the parts of
    ``--authors-semantics`` they carry) ``_authors_<part>-<part>``, so that they never share a
    directory with the default ones. Input-channel weight groups (``group_axis="in"``) are
    ``rdcurves_inchan_…`` as the authors named them."""
    tag = (f"_sort{sort}" if sort else "") + ("_authors_" + "-".join(authors) if authors else "")
    if kind == "weight":
        return (
            f"{arch}_ndz_{ndz:04d}_nr_{nr:04d}_ns_{ns:04d}_nf_{nf:04d}"
            f"{tag}_rdcurves_{'inchan_' if group_axis == 'in' else ''}channelwise_opt_dist"
        )
    if kind != "act":
        raise ValueError(f"kind must be 'weight' or 'act', got {kind!r}")
    where = "out_channelwise" if act_mode == "out" else "channelwise"
    return f"{arch}_nr_{nr:04d}_ns_{ns:04d}_nf_{nf:04d}{tag}_rdcurves_{where}_opt_dist_act"


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: Path, write: Callable[[BinaryIO], Any]) -> None:
    """Create ``path`` atomically: ``write(f)`` fills a temp file in the same directory, which
    then replaces ``path`` (a crash leaves the old file or none, never a partial one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp makes the file private (0600); give it the mode a plain open() would.
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _create_json_exclusive(path: Path, obj: Any) -> None:
    """Write ``obj`` to ``path`` only if no file is there; ``FileExistsError`` otherwise.

    The temp file is hard-linked into place, so two parts starting together cannot both create
    meta.json: the loser re-reads the winner's file and compares settings."""
    data = (json.dumps(obj, indent=1) + "\n").encode()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.link(tmp, path)
    finally:
        os.unlink(tmp)


def read_json_artifact(
    path: Path, schema: str | tuple[str, ...], keys: tuple[str, ...]
) -> dict[str, Any]:
    """A JSON artifact (no code executed) whose ``schema`` (one of them, if several are read)
    and top-level ``keys`` are checked; ValueError names the file and what is wrong."""
    accepted = (schema,) if isinstance(schema, str) else schema
    try:
        obj = json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(obj, dict) or obj.get("schema") not in accepted:
        found = obj.get("schema") if isinstance(obj, dict) else None
        want = " or ".join(map(repr, accepted))
        raise ValueError(
            f"{path}: schema {found!r} is not {want}; re-create it with this version of rdoq"
        )
    for key in keys:
        if key not in obj:
            raise ValueError(f"{path}: missing key {key!r}")
    return obj


def atomic_write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    data = (json.dumps(obj, indent=1, sort_keys=False) + "\n").encode()
    atomic_write_bytes(Path(path), lambda f: f.write(data))


def _canonical(value: Any) -> Any:
    # JSON round trip turns tuples into lists etc., so compare what would be stored.
    return json.loads(json.dumps(value))


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    """Every array of an ``.npz`` file, no pickles. A damaged file raises one of
    ``DAMAGED_FILE_ERRORS``."""
    z = np.load(path, allow_pickle=False)
    if not isinstance(z, np.lib.npyio.NpzFile):
        raise ValueError("not an .npz archive")
    with z:
        # Reading each member to its end makes zipfile check its CRC: flipped bytes inside an
        # array are caught here, not only a truncated archive.
        return {k: z[k] for k in z.files}


def _check_meta(path: Path, meta: dict[str, Any]) -> None:
    """The parts of a curve set's meta.json that readers index into; ValueError names the file."""

    def bad(what: str) -> ValueError:
        return ValueError(f"{path}: {what}; re-create the curve set with the curve script")

    if meta["kind"] not in ("weight", "act"):
        raise bad(f"kind {meta['kind']!r} is not 'weight' or 'act'")
    if not isinstance(meta["group_size"], int) or meta["group_size"] < 1:
        raise bad(f"group_size {meta['group_size']!r} is not a positive integer")
    bits = meta["bits"]
    if not isinstance(bits, list) or not bits or not all(isinstance(b, int) for b in bits):
        raise bad(f"bits {_short(bits)} is not a list of integers")
    if not isinstance(meta["layers"], list):
        raise bad("layers is not a list")
    for i, entry in enumerate(meta["layers"]):
        if not isinstance(entry, dict):
            raise bad(f"layers[{i}] is not an object")
        for key, kind in (
            ("name", str),
            ("type", str),
            ("shape", list),
            ("groups", int),
            ("numel", int),
        ):
            if not isinstance(entry.get(key), kind):
                raise bad(f"layers[{i}] ({entry.get('name', '?')}) has no {kind.__name__} {key!r}")


@dataclass
class LayerCurves:
    """Curves of one layer. Shapes: ``dist/step_log2/deadzone (G, D, B)``, ``numel (G,)``;
    ``extra`` holds the optional arrays (weights: ``entropy (G, D, B)``, per-channel steps;
    second-order curves with folds: ``dist_folds (F, G, D, B)``)."""

    dist: np.ndarray
    step_log2: np.ndarray
    deadzone: np.ndarray
    numel: np.ndarray
    extra: dict[str, np.ndarray]

    def validate(self, name: str) -> None:
        g, d, b = self.dist.shape
        for key in ("step_log2", "deadzone"):
            if getattr(self, key).shape != (g, d, b):
                raise ValueError(
                    f"layer {name}: {key} has shape {getattr(self, key).shape}, "
                    f"expected {(g, d, b)}"
                )
        if self.numel.shape != (g,):
            raise ValueError(f"layer {name}: numel has shape {self.numel.shape}, expected {(g,)}")
        # Optional (weight curves made before entropy rates were stored lack it).
        entropy = self.extra.get("entropy")
        if entropy is not None and entropy.shape != (g, d, b):
            raise ValueError(
                f"layer {name}: entropy has shape {entropy.shape}, expected {(g, d, b)}"
            )
        # Optional: each calibration fold's own curve (second-order curves with --folds).
        folds = self.extra.get("dist_folds")
        if folds is not None and (folds.ndim != 4 or folds.shape[1:] != (g, d, b)):
            raise ValueError(
                f"layer {name}: dist_folds has shape {folds.shape}, expected (F, {g}, {d}, {b})"
            )
        if np.isnan(self.dist).any():
            raise ValueError(f"layer {name}: dist contains NaN")


class CurveStore:
    """A curve-set directory. Create with :meth:`open`, which checks or writes ``meta.json``."""

    def __init__(self, root: Path, meta: dict[str, Any]):
        self.root = Path(root)
        self.meta = meta

    @classmethod
    def open(cls, root: Path | str, meta: dict[str, Any]) -> CurveStore:
        """Open ``root`` for writing curves made with ``meta``.

        Writes ``meta.json`` if absent. If present, every key of ``SETTINGS_KEYS`` must agree,
        otherwise ``ValueError`` names the first differing setting and both values.
        """
        root = Path(root)
        v3 = any(meta.get(k) for k in OPTIONAL_SETTINGS_KEYS)
        meta = {"schema": SCHEMA_V3 if v3 else SCHEMA, **meta}
        path = root / "meta.json"
        if not path.exists():
            root.mkdir(parents=True, exist_ok=True)
            try:
                _create_json_exclusive(path, meta)
                return cls(root, meta)
            except FileExistsError:
                pass  # another part created it first: compare with its settings below
        old = cls.read_meta(root)
        for key in (*SETTINGS_KEYS, *OPTIONAL_SETTINGS_KEYS):
            if _canonical(old.get(key)) != _canonical(meta.get(key)):
                # Sets made before folds were stored resume with the flag that turns them off.
                hint = (
                    f" (--folds {old['folds']['count'] if old.get('folds') else 0})"
                    if key == "folds"
                    else ""
                )
                raise ValueError(
                    f"{root} already holds curves made with {key}={_short(old.get(key))}, "
                    f"this run has {key}={_short(meta.get(key))}; use another --outdir or "
                    f"the same settings{hint} to resume"
                )
        return cls(root, old)

    @classmethod
    def load(cls, root: Path | str) -> CurveStore:
        """Open an existing curve set for reading."""
        return cls(Path(root), cls.read_meta(root))

    @staticmethod
    def read_meta(root: Path | str) -> dict[str, Any]:
        path = Path(root) / "meta.json"
        if not path.is_file():
            raise FileNotFoundError(f"no curve set at {root}: {path} is missing")
        meta = read_json_artifact(
            path, (SCHEMA, SCHEMA_V3), ("kind", "group_size", "bits", "layers")
        )
        _check_meta(path, meta)
        return meta

    def layer_path(self, name: str) -> Path:
        if "/" in name or name.startswith("."):
            raise ValueError(f"layer name {name!r} cannot be a file name")
        return self.root / "layers" / f"{name}.npz"

    @property
    def settings_digest(self) -> str:
        """sha256 of the settings keys of meta.json; stamped into every layer file."""
        settings = {k: self.meta.get(k) for k in SETTINGS_KEYS}
        # Absent from sets without them, whose digests they keep.
        settings |= {k: self.meta[k] for k in OPTIONAL_SETTINGS_KEYS if self.meta.get(k)}
        return hashlib.sha256(json.dumps(_canonical(settings), sort_keys=True).encode()).hexdigest()

    def has_layer(self, name: str) -> bool:
        """Whether a finished layer file made with this curve set's settings exists (a file left
        by other settings, e.g. after meta.json was replaced, does not count, nor does a damaged
        file: a resuming curve run recomputes both)."""
        path = self.layer_path(name)
        if not path.is_file():
            return False
        try:
            arrays = _load_npz(path)
        except DAMAGED_FILE_ERRORS as e:
            log.warning(
                "%s is unreadable (%s: %s): counted as missing; a curve run into %s recomputes it",
                path,
                type(e).__name__,
                e,
                self.root,
            )
            return False
        stamp = arrays.get("settings_digest")
        return stamp is not None and str(stamp) == self.settings_digest

    def layer_names(self) -> list[str]:
        return [layer["name"] for layer in self.meta["layers"]]

    def missing_layers(self) -> list[str]:
        return [n for n in self.layer_names() if not self.has_layer(n)]

    def write_layer(self, name: str, curves: LayerCurves) -> None:
        """Write one layer's curves atomically."""
        curves.validate(name)
        arrays = {k: getattr(curves, k) for k in LAYER_ARRAYS} | curves.extra
        arrays["settings_digest"] = np.array(self.settings_digest)
        atomic_write_bytes(self.layer_path(name), lambda f: np.savez(f, **arrays))

    def read_layer(self, name: str) -> LayerCurves:
        """Read one layer's curves (no pickles) and check them against ``meta.json``."""
        path = self.layer_path(name)
        if not path.is_file():
            raise FileNotFoundError(f"curve set {self.root} has no layer {name!r} ({path} missing)")
        try:
            arrays = _load_npz(path)
        except DAMAGED_FILE_ERRORS as e:
            raise ValueError(
                f"{path} is unreadable ({type(e).__name__}: {e}); re-run the curve "
                f"script into {self.root} to recompute it"
            ) from e
        digest = arrays.pop("settings_digest", None)
        if digest is None or str(digest) != self.settings_digest:
            raise ValueError(
                f"{path} was made with other settings than {self.root}/meta.json; "
                f"re-run the curve script into this directory to recompute it"
            )
        missing = [k for k in LAYER_ARRAYS if k not in arrays]
        if missing:
            raise ValueError(f"{path} lacks arrays {missing}")
        curves = LayerCurves(**{k: arrays.pop(k) for k in LAYER_ARRAYS}, extra=arrays)
        curves.validate(name)
        entry = next((x for x in self.meta["layers"] if x["name"] == name), None)
        if entry is not None and curves.dist.shape[0] != entry["groups"]:
            raise ValueError(
                f"{path}: {curves.dist.shape[0]} groups, meta.json says {entry['groups']}"
            )
        return curves


def _short(value: Any, limit: int = 120) -> str:
    text = json.dumps(value)
    return text if len(text) <= limit else text[:limit] + "…"


def summarize(root: Path | str) -> dict[str, Any]:
    """Facts about a curve set for people: settings, completeness, and per bit width the
    element-weighted median of ``dist(b) / dist(0)`` over groups (best dead zone per group)."""
    store = CurveStore.load(root)
    meta = store.meta
    missing = store.missing_layers()
    ratios: list[np.ndarray] = []
    for name in store.layer_names():
        if name in missing:
            continue
        c = store.read_layer(name)
        best = c.dist.min(axis=1)  # (G, B)
        live = best[:, 0] > 0
        ratios.append(best[live] / best[live, :1])
    table = np.concatenate(ratios) if ratios else np.zeros((0, len(meta["bits"])))  # (G, B)
    return {
        "curve_set": Path(root).name,
        "kind": meta["kind"],
        "act_mode": meta.get("act_mode"),
        "estimator": meta.get("estimator"),
        "model": meta.get("model"),
        "group_size": meta["group_size"],
        "layers": len(meta["layers"]),
        "missing_layers": missing,
        "groups": int(sum(layer["groups"] for layer in meta["layers"])),
        "median_dist_ratio": {
            int(b): float(np.median(table[:, i])) if len(table) else None
            for i, b in enumerate(meta["bits"])
        },
    }


def meta_digest(meta: dict[str, Any]) -> str:
    """sha256 of a curve set's meta.json content (what an allocation was solved from)."""
    return hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()


def open_curve_set(root: Path | str, kind: str, act_mode: str | None = None) -> CurveStore:
    """A complete curve set of ``kind`` (``act_mode`` for activations), or an error naming what is
    missing or different."""
    store = CurveStore.load(root)
    meta = store.meta
    if meta["kind"] != kind:
        raise ValueError(f"{root} holds {meta['kind']} curves, expected {kind} curves")
    if kind == "act" and act_mode is not None and meta.get("act_mode") != act_mode:
        raise ValueError(
            f"{root} holds activation curves of layer {meta.get('act_mode')}puts, "
            f"this script needs {act_mode}put curves"
        )
    missing = store.missing_layers()
    if missing:
        more = f" … ({len(missing)} in all)" if len(missing) > 5 else ""
        raise ValueError(
            f"curve set {root} misses layers {missing[:5]}{more}; run the curve "
            f"script again with the same settings (and every --part_id) to finish it"
        )
    return store


def find_act_curve_set(
    root: Path | str,
    model: str,
    act_mode: str,
    group_size: int | None = None,
    authors: Sequence[str] | None = None,
) -> Path:
    """The activation curve set under ``root`` (the paper's ``--act_curve_root_dir``) for
    ``model`` and ``act_mode`` (and, given ``authors``, made with exactly these authors' curve
    rules); ``root`` may also be the curve set itself."""
    root = Path(root)
    if (root / "meta.json").is_file():
        return root
    if not root.is_dir():
        raise FileNotFoundError(f"--act_curve_root_dir {root} does not exist")
    found = []
    for d in sorted(p for p in root.iterdir() if (p / "meta.json").is_file()):
        meta = CurveStore.read_meta(d)
        if (
            meta["kind"] == "act"
            and meta.get("act_mode") == act_mode
            and meta.get("model") == model
            and (group_size is None or meta["group_size"] == group_size)
            and (authors is None or curve_rules_of(meta) == list(authors))
        ):
            found.append(d)
    if not found:
        raise FileNotFoundError(
            f"no {act_mode}put activation curve set of {model} under {root}; "
            f"run the activation curve script with --outdir {root}"
        )
    if len(found) > 1:
        raise ValueError(
            f"several activation curve sets of {model} under {root}: "
            f"{[d.name for d in found]}; pass one of them as --act_curve_root_dir"
        )
    return found[0]


def check_same_model(weight_meta: dict[str, Any], act_meta: dict[str, Any]) -> None:
    """Weight and activation curves must describe the same model and weights."""
    for key in ("model", "checkpoint_sha256", "weights_source"):
        if weight_meta.get(key) != act_meta.get(key):
            raise ValueError(
                f"the weight and activation curve sets differ in {key}: "
                f"{weight_meta.get(key)!r} vs {act_meta.get(key)!r}; use curves of "
                f"the same model and checkpoint"
            )
