"""Print one table (method × target) of every results.jsonl under the given paths.

All logic lives in rdoq.cli_eval and rdoq.report.
"""

import sys
from pathlib import Path

# Runs from a checkout whether or not the package is installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rdoq.cli_eval import results_main  # noqa: E402

if __name__ == "__main__":
    print(results_main())
