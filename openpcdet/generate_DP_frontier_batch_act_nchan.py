"""Bit allocation of an OpenPCDet detector for target rates, then apply and evaluate (the paper's
tools/generate_DP_frontier_batch_act_nchan.py; weights only, as there).

Run from OpenPCDet's tools/ directory, or from anywhere with --pcdet_tools DIR. mAP/NDS need a
GPU; without one the allocation files and distortions are written and the script exits with 3.
All logic lives in rdoq.detection.
"""

import sys
from pathlib import Path

# Runs from a checkout whether or not the package is installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rdoq.detection import EXIT_NEEDS_GPU, allocate_main  # noqa: E402

if __name__ == "__main__":
    result = allocate_main()
    print(result["table"])
    if result["stopped"]:
        # mAP/NDS could not be computed (no GPU): the reason, and a distinct exit status.
        sys.stderr.write(f"{Path(sys.argv[0]).name}: error: {result['stopped']}\n")
        raise SystemExit(EXIT_NEEDS_GPU)
