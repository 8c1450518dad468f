"""Stage 2 of the dialogue transfer (full mode: projector, LM and the encoder's used layers train) on
2 gloo ranks equals 1 rank on the same global batches (tests/eval/test_dialogue_parallel.py writes the
fixtures into OUT/..; rank 0 saves the trained weights)."""

import os

from common import mark_done, parse_out_dir, save_rank0
from megatron_lcl.eval.dialogue import conversations as conv
from megatron_lcl.eval.dialogue import task
from megatron_lcl.eval.dialogue.model import dialogue_encoder, load_vision_tower
from megatron_lcl.eval.parallel import init_parallel


def stage2_weights(root: str, layout) -> dict:
    """3 AdamW steps of 8 conversations (4 per rank on 2 ranks), full mode; the trained weights."""
    corpus = os.path.join(root, "corpus")
    source = conv.read_llava_json(os.path.join(corpus, "stage2.json"))
    clip, src, kind = load_vision_tower(os.path.join(root, "clip"))
    cfg = task.DialogueConfig(stage=2, mode="full", steps=3, batch_size=8, lr=1e-3, encoder_lr=1e-3, warmup_steps=1,
                              num_workers=0)
    result = task.run_dialogue(dialogue_encoder(clip, -2, "default", src, kind), os.path.join(root, "lm"), source,
                               cfg, layout)
    return {k: v.detach().clone() for k, v in result["_model"].trainable_state().items()}


def main():
    out = parse_out_dir()
    layout = init_parallel()
    weights = stage2_weights(os.path.dirname(os.path.abspath(out)), layout)
    save_rank0(weights, out, "dialogue_ddp.pt")
    mark_done(out)


if __name__ == "__main__":
    main()
