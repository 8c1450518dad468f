"""Transfer evaluation on 2 gloo ranks: a data-parallel probe (frozen and full) and retrieval run
equal the 1-rank run on the same global batches; the streaming classify CLI under torchrun.

Run by tests/eval/test_eval_streaming.py (fixtures in OUT/.., written by the test); rank 0 saves
the trained weights, which the test compares with the same runs in one process.
"""

import os


from common import mark_done, parse_out_dir, save_rank0
from eval_fixtures import patch_encoder
from megatron_lcl.eval import classify, retrieve
from megatron_lcl.eval.parallel import init_parallel
from megatron_lcl.eval.sources import labeled_source, pair_source

PROBE = dict(steps=3, batch_size=16, lr=3e-3, warmup_steps=1, num_workers=0)
RETRIEVAL = dict(steps=3, batch_size=16, embed_dim=16, text_width=16, text_layers=1, text_heads=2,
                 warmup_steps=1, num_workers=0)


def probe_weights(fixtures: str, mode: str, layout) -> dict:
    """Train the probe for PROBE's steps; its head (and in full mode the encoder) weights."""
    encoder = patch_encoder()
    train = labeled_source(os.path.join(fixtures, "folder", "train"))
    val = labeled_source(os.path.join(fixtures, "folder", "val"))
    cfg = classify.ProbeConfig(mode=mode, encoder_lr=1e-2, **PROBE)
    result = classify.run_classification(encoder, train, val, cfg, layout)
    return {"head": {k: v.clone() for k, v in result.pop("_model").trainable_state().items()}, "result": result}


def retrieval_weights(fixtures: str, layout) -> dict:
    train = pair_source(os.path.join(fixtures, "shards"))
    tests = retrieve.retrieval_sets([os.path.join(fixtures, "shards")],
                                    [os.path.join(fixtures, "coco", "dataset_coco.json")], None, 0.2, 0)[1]
    cfg = retrieve.RetrievalConfig(**RETRIEVAL)
    result = retrieve.run_retrieval(patch_encoder(), train, tests, cfg, layout)
    return {"head": {k: v.clone() for k, v in result.pop("_model").trainable_state().items()}, "result": result}


def main():
    out = parse_out_dir()
    fixtures = os.path.dirname(os.path.abspath(out))  # the test writes the fixtures beside OUT
    layout = init_parallel()
    results = {"world": layout.dp_size,
               "probe_frozen": probe_weights(fixtures, "frozen", layout),
               "probe_full": probe_weights(fixtures, "full", layout),
               "retrieval": retrieval_weights(fixtures, layout)}
    cli = classify.run_command_line(["--encoder", os.path.join(fixtures, "hf_vision"), "--data", os.path.join(fixtures, "folder"),
                         "--steps", "2", "--batch-size", "8", "--num-workers", "1",
                         "--output", os.path.join(out, "cli_cls.json")])
    results["cli_world"] = cli["world_size"]
    save_rank0(results, out, "ddp.pt")
    mark_done(out)


if __name__ == "__main__":
    main()
