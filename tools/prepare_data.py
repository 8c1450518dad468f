"""Convert MMC4 / OBELICS / LAION into the webdataset shards the LCL loader streams (`lcl-prepare-data`).

    python tools/prepare_data.py --format mmc4 --input mmc4/docs/ --images-dir mmc4/images --output data/mmc4

The command lives in megatron_lcl/data/prepare.py (every format and rule is described there and in
docs/data.md).
"""

import sys

from megatron_lcl.data.prepare import main

if __name__ == "__main__":
    sys.exit(main())
