"""Load a megatron_lcl checkpoint and its HuggingFace export side by side; print how close they are
(`lcl-verify-hf`).

    python tools/checkpoint/verify_hf.py --load runs/demo/checkpoints --hf runs/demo/hf

The command lives in megatron_lcl/hf/verify.py (the bounds are described there). Exits 1 when a
figure is out of bounds.
"""

from megatron_lcl.hf.verify import main

if __name__ == "__main__":
    main()
