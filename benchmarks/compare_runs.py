"""Compare the outputs of two runs of the same commands (e.g. two checkouts of rdoq): the check
behind "behaviour unchanged" in a refactor.

Usage: ``python benchmarks/compare_runs.py OLD_DIR NEW_DIR``. Both trees must hold the same files.
Every array of every ``.npz`` (curve layer files) must be equal, NaNs included; ``.json`` and
``.jsonl`` files must be equal except for keys that describe one invocation (paths, times,
command lines) and keys that only the new run has (an added field is listed, not an error).
Prints one line per difference and a summary; exits 1 on any difference.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

# Keys that differ between two runs of the same settings.
VOLATILE = frozenset(
    {"created", "argv", "path", "allocation", "curve_set", "curve_sets", "outdir", "source", "root"}
    | {"pathrdcurve", "act_curve_root_dir", "args", "seconds", "settings_digest"}
)


def _clean(obj: Any) -> Any:
    """``obj`` without volatile keys, timings (``*_s``) or absolute paths."""
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items() if k not in VOLATILE and not k.endswith("_s")}
    if isinstance(obj, list):
        return [_clean(v) for v in obj]
    if isinstance(obj, str) and obj.startswith("/"):
        return "<path>"
    return obj


def _without_new(old: Any, new: Any, added: Counter) -> Any:
    """``new`` without the dict keys ``old`` lacks (counted in ``added``), recursively."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = {}
        for k, v in new.items():
            if k in old:
                out[k] = _without_new(old[k], v, added)
            else:
                added[k] += 1
        return out
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [_without_new(o, n, added) for o, n in zip(old, new, strict=True)]
    return new


def _json_items(path: Path) -> list[Any]:
    text = path.read_text()
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    return [json.loads(text)]


def compare(old: Path, new: Path) -> dict[str, Any]:
    """Differences between the run trees ``old`` and ``new``: a summary with ``differences``
    (a list of strings) and what the new run only adds."""
    files = sorted(p.relative_to(old) for p in old.rglob("*") if p.is_file())
    new_files = sorted(p.relative_to(new) for p in new.rglob("*") if p.is_file())
    diffs = [f"only in {old}: {f}" for f in sorted(set(files) - set(new_files))]
    diffs += [f"only in {new}: {f}" for f in sorted(set(new_files) - set(files))]
    added_arrays, added_keys = Counter(), Counter()
    arrays = documents = 0
    for rel in sorted(set(files) & set(new_files)):
        a, b = old / rel, new / rel
        if rel.suffix == ".npz":
            with np.load(a) as za, np.load(b) as zb:
                added_arrays.update(k for k in zb.files if k not in za.files)
                for k in za.files:
                    if k in VOLATILE:
                        continue
                    if k not in zb.files or not np.array_equal(za[k], zb[k], equal_nan=True):
                        diffs.append(f"array {k} of {rel}")
                    else:
                        arrays += 1
        elif rel.suffix in (".json", ".jsonl"):
            la = [_clean(x) for x in _json_items(a)]
            lb = [_clean(x) for x in _json_items(b)]
            if len(la) == len(lb):
                lb = [_without_new(x, y, added_keys) for x, y in zip(la, lb, strict=True)]
            if la != lb:
                diffs.append(f"content of {rel}")
            else:
                documents += 1
    return {
        "files": len(files),
        "arrays_equal": arrays,
        "json_equal": documents,
        "differences": diffs,
        "arrays_only_in_new": dict(added_arrays),
        "keys_only_in_new": dict(added_keys),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("old", type=Path, help="output tree of the reference run")
    p.add_argument("new", type=Path, help="output tree of the run to check")
    args = p.parse_args(argv)
    for d in (args.old, args.new):
        if not d.is_dir():
            p.error(f"{d} is not a directory")
    result = compare(args.old, args.new)
    for d in result["differences"]:
        print("DIFFERS:", d)
    print(json.dumps({k: v for k, v in result.items() if k != "differences"}))
    return 1 if result["differences"] else 0


if __name__ == "__main__":
    sys.exit(main())
