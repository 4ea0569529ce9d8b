"""Weight RD curves (first order).

The paper's script name; all logic lives in rdoq.cli_curves and rdoq.curves.
"""

import json
import sys
from pathlib import Path

# Runs from a checkout whether or not the package is installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rdoq.cli_curves import curves_main  # noqa: E402

if __name__ == "__main__":
    print(json.dumps(curves_main("weight")))
