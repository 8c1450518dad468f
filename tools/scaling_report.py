"""Fit power laws to a sweep's results.csv; write plots and a report (`lcl-scaling-report`).

    python tools/scaling_report.py runs/scaling/tiny_ladder/results.csv --out docs/scaling

The command lives in megatron_lcl/scaling/report.py (what it fits and writes is described there).
"""

import sys

from megatron_lcl.scaling.report import main

if __name__ == "__main__":
    sys.exit(main())
