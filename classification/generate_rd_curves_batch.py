"""Weight rd curves (first order).

The paper's script name; all logic lives in rdoq.cli and rdoq.curves.
"""

import sys
from pathlib import Path

# Runs from a checkout whether or not the package is installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rdoq.cli import curves_main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(curves_main("weight"))
