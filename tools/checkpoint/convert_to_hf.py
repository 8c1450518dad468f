"""megatron_lcl checkpoint (any TP/PP) -> HuggingFace `transformers` folder (`lcl-convert-to-hf`).

    python tools/checkpoint/convert_to_hf.py --load runs/demo/checkpoints --save runs/demo/hf [--overwrite]

The command lives in megatron_lcl/hf/export.py (what it writes is described there).
"""

import sys

from megatron_lcl.hf.export import main

if __name__ == "__main__":
    sys.exit(main())
