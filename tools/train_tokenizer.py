"""Train the LCL sentencepiece tokenizer on the text of any supported source (`lcl-train-tokenizer`).

    python tools/train_tokenizer.py --format mmc4 --input DIR_OR_FILES --output PREFIX --vocab-size 32000

The command lives in megatron_lcl/data/build_tokenizer.py.
"""

import sys

from megatron_lcl.data.build_tokenizer import main

if __name__ == "__main__":
    sys.exit(main())
