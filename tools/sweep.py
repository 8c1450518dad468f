"""Run a scaling sweep: a ladder of model sizes x compute budgets (`lcl-sweep`).

    python tools/sweep.py examples/scaling/tiny_ladder.yaml                 # run missing points here
    python tools/sweep.py examples/scaling/tiny_ladder.yaml --list          # points, FLOPs, status

The command lives in megatron_lcl/scaling/run_sweep.py (every option is described there).
"""

import sys

from megatron_lcl.scaling.run_sweep import main

if __name__ == "__main__":
    sys.exit(main())
