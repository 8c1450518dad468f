"""Captioning on 2 gloo ranks equals 1 rank on the same global batches (tests/eval/test_eval_caption.py
writes the fixtures into OUT/..; rank 0 saves the trained projector + LM weights)."""

import os


from common import mark_done, parse_out_dir, save_rank0
from eval_fixtures import patch_encoder
from megatron_lcl.eval import caption
from megatron_lcl.eval.karpathy import as_test_set
from megatron_lcl.eval.parallel import init_parallel
from megatron_lcl.eval.sources import pair_source


def caption_weights(root: str, layout) -> dict:
    """3 SGD-free AdamW steps of 8 pairs (4 per rank on 2 ranks); the trained weights."""
    source = pair_source(os.path.join(root, "pairs.jsonl"))
    cfg = caption.CaptionConfig(steps=3, batch_size=8, lr=1e-3, warmup_steps=1, num_workers=0, max_new_tokens=3,
                                metric_tokenizer="python")
    result = caption.run_captioning(patch_encoder(), os.path.join(root, "lm"), source,
                                    [as_test_set(pair_source(os.path.join(root, "pairs.jsonl")), "pairs")], cfg,
                                    layout)
    return {k: v.clone() for k, v in result["_model"].trainable_state().items()}


def main():
    out = parse_out_dir()
    layout = init_parallel()
    weights = caption_weights(os.path.dirname(os.path.abspath(out)), layout)
    save_rank0(weights, out, "caption_ddp.pt")
    mark_done(out)


if __name__ == "__main__":
    main()
