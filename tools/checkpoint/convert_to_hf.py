"""megatron_lcl checkpoint (any TP/PP) -> HuggingFace `transformers` folder.

    python tools/checkpoint/convert_to_hf.py --load runs/demo/checkpoints --save runs/demo/hf

Writes OUT/vision (CLIPVisionModel), OUT/lm (OPTForCausalLM with its tokenizer: a complete
AutoModelForCausalLM + AutoTokenizer folder), OUT/tokenizer (the tokenizer alone),
OUT/lcl_heads.safetensors and OUT/README.md (what each file is and how to use it).
"""

import argparse
import sys

from megatron_lcl.runtime.mcore_compat import filter_known_warnings

filter_known_warnings()  # before megatron.core is imported


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--load", required=True, help="checkpoints/ folder (uses `latest`) or one step_* folder")
    parser.add_argument("--save", required=True, help="output folder")
    args = parser.parse_args(argv)
    from megatron_lcl.checkpoint import resolve_checkpoint
    from megatron_lcl.hf.export import export_to_hf

    try:
        found = resolve_checkpoint(args.load)
    except FileNotFoundError as e:  # `latest` names an incomplete checkpoint and there is no other
        found, why = None, str(e)
    else:
        why = "no complete checkpoint there (a run directory, its checkpoints/ or one step_* folder)"
    if found is None:
        print(f"error: --load {args.load}: {why}", file=sys.stderr)
        return 2
    export_to_hf(found, args.save)
    return 0


if __name__ == "__main__":
    sys.exit(main())
