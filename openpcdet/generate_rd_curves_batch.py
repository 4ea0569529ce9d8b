"""Weight or activation RD curves of an OpenPCDet detector (the paper's
tools/generate_rd_curves_batch.py; activation curves are ours).

Run from OpenPCDet's tools/ directory, or from anywhere with --pcdet_tools DIR. All logic lives
in rdoq.detection, rdoq.curves and rdoq.adapters.openpcdet.
"""

import json
import sys
from pathlib import Path

# Runs from a checkout whether or not the package is installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rdoq.detection import curves_main  # noqa: E402

if __name__ == "__main__":
    print(json.dumps(curves_main()))
