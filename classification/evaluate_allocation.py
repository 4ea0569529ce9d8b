"""Re-evaluate saved allocation files (allocation_<target>.json) on a model.

All logic lives in rdoq.cli_eval, rdoq.apply and rdoq.evaluate.
"""

import sys
from pathlib import Path

# Runs from a checkout whether or not the package is installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rdoq.cli_eval import evaluate_main  # noqa: E402

if __name__ == "__main__":
    print(evaluate_main()["table"])
