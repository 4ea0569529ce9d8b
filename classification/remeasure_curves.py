"""Re-measure, with the measured engine, the layers whose second-order estimates decide the
allocation, into a new complete curve set (not a script of the paper; rdoq.remeasure).
"""

import json
import sys
from pathlib import Path

# Runs from a checkout whether or not the package is installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rdoq.remeasure import remeasure_main  # noqa: E402

if __name__ == "__main__":
    out = remeasure_main()
    if "table" in out:  # --list
        print(out.pop("table"))
    print(json.dumps(out))
