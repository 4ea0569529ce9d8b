"""Bit allocation by the Lagrangian (paper eq. 22) for target rates, then apply + evaluate.

The paper's script name; all logic lives in rdoq.cli_alloc, rdoq.allocation, rdoq.apply,
rdoq.evaluate.
"""

import sys
from pathlib import Path

# Runs from a checkout whether or not the package is installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rdoq.cli_alloc import allocate_main  # noqa: E402

if __name__ == "__main__":
    print(allocate_main("lg")["table"])
