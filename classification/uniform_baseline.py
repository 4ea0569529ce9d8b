"""Uniform-precision baseline (same bits everywhere, per-channel MSE-optimal steps), evaluated
exactly like the RD-optimised allocations. Not a paper script: RDOQ's reference point.
"""

import sys
from pathlib import Path

# Runs from a checkout whether or not the package is installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rdoq.cli_eval import uniform_main  # noqa: E402

if __name__ == "__main__":
    print(uniform_main()["table"])
