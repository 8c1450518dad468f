"""Initialise a megatron_lcl checkpoint from HuggingFace weights on disk (`lcl-convert-from-hf`).

    python tools/checkpoint/convert_from_hf.py --config examples/configs/vit_b16_opt125m_mmc4.yaml \\
        --vision path/to/clip-vit-b16 --lm path/to/opt-125m --save runs/init/checkpoint [--overwrite]

The command lives in megatron_lcl/hf/from_hf.py (what must match, and what is refused, is described there).
"""

import sys

from megatron_lcl.hf.from_hf import main

if __name__ == "__main__":
    sys.exit(main())
