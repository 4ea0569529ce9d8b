"""Train the bundled digits models (the embedded default, DESIGN §10) and write their weights.

Deterministic on one machine: fixed seed, one thread, torch.use_deterministic_algorithms. Prints
each model's test accuracy and the sha256 of each file written; copy those hashes into
WEIGHTS_SHA256 in rdoq/adapters/digits.py when the committed weights change. Writes only
<outdir>/<archname>.pt.
"""

import argparse
import json
import sys
import time
from pathlib import Path

# Runs from a checkout whether or not the package is installed.
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from rdoq.adapters.digits import (  # noqa: E402
    DEFAULT_EPOCHS,
    DIGITS_ARCHS,
    save_weights,
    train_digits_model,
)
from rdoq.cli import script_entry  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--archname",
        default="all",
        choices=[*DIGITS_ARCHS, "all"],
        help="model to train, or all of them (default: %(default)s)",
    )
    p.add_argument(
        "--outdir",
        type=Path,
        default=Path("runs/digits_models"),
        help="directory the <archname>.pt state dicts are written to (default: "
        "%(default)s, created; pass rdoq/adapters/digits_models to replace the "
        "bundled weights, then copy the printed sha256 into WEIGHTS_SHA256)",
    )
    p.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="passes over the 1257 train images (default per model: "
        + ", ".join(f"{k} {v}" for k, v in DEFAULT_EPOCHS.items())
        + ")",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the init and the minibatch order (default: %(default)s)",
    )
    return p.parse_args(argv)


@script_entry("interrupted; the models finished so far are written to --outdir")
def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    if args.outdir == Path("runs/digits_models"):
        args.outdir.mkdir(parents=True, exist_ok=True)
    if not args.outdir.is_dir():
        raise SystemExit(f"--outdir {args.outdir} does not exist; create it or pass another one")
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    names = DIGITS_ARCHS if args.archname == "all" else (args.archname,)
    results = []
    for name in names:
        start = time.perf_counter()
        model, acc = train_digits_model(name, args.epochs, args.seed)
        seconds = time.perf_counter() - start
        path = args.outdir / f"{name}.pt"
        sha = save_weights(model, path)
        results.append(
            {
                "archname": name,
                "test_acc": round(acc, 4),
                "train_s": round(seconds, 1),
                "file": str(path),
                "bytes": path.stat().st_size,
                "sha256": sha,
            }
        )
    return results


if __name__ == "__main__":
    for result in main():
        print(json.dumps(result))
