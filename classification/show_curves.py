"""Summarise curve sets: settings, completeness, median distortion per bit width."""

import sys
from pathlib import Path

# Runs from a checkout whether or not the package is installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rdoq.cli_curves import show_main  # noqa: E402

if __name__ == "__main__":
    print(show_main())
