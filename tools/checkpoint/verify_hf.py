"""Load a megatron_lcl checkpoint and its HF export side by side and print how close they are.

    python tools/checkpoint/verify_hf.py --load runs/demo/checkpoints --hf runs/demo/hf

Bounds: vision latents max abs diff <= 1e-4 (fp32), text-only and interleaved logits KL <= 1e-6,
tokenizer ids equal. Exits 1 when a figure is out of bounds.
"""

import argparse
import os
import sys

from megatron_lcl.runtime.mcore_compat import filter_known_warnings

filter_known_warnings()  # before megatron.core is imported


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--load", required=True)
    parser.add_argument("--hf", required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)


    from megatron_lcl.checkpoint import load_pretrained
    from megatron_lcl.hf.verify import BOUNDS, compare, compare_tokenizers, load_hf, within_bounds
    from megatron_lcl.testing import random_batch

    lcl = load_pretrained(args.load)
    clip, opt, projector = load_hf(args.hf)
    v, lm = lcl.cfg.model.vision, lcl.cfg.model.lm
    seq = min(lm.max_position_embeddings, 3 * (v.num_image_tokens + 2) + 16)
    vocab = min(lm.vocab_size, opt.config.vocab_size)
    batch = random_batch([[2], [5, 5 + v.num_image_tokens + 4]], seq, v.num_image_tokens, v.image_size,
                         vocab, seed=args.seed)
    figures = compare(lcl, clip, opt, batch.tokens, batch.images, batch.image_sample_index,
                      batch.boi_positions, projector)
    tok_dir = os.path.join(args.hf, "tokenizer")
    if lcl.cfg.data.tokenizer and os.path.isdir(tok_dir):
        figures.update(compare_tokenizers(lcl.cfg.data.tokenizer, tok_dir,
                                          ["a red circle on a striped background", " Hello, World 123!"]))
    for k, value in figures.items():
        bound = BOUNDS.get(k)
        print(f"{k:<24} {value!s:<24} {'<= ' + str(bound) if bound else ''}")
    ok = within_bounds(figures)
    print("OK" if ok else "OUT OF BOUNDS")
    if not ok:
        sys.exit(1)
    return figures


if __name__ == "__main__":
    main()
