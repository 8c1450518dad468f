"""Sequence parallelism on 2 gloo ranks: TP=2 + SP == TP=2 == TP=1 on the whole LCL model.

The TP=2 runs go through megatron-core DDP and `finalize_model_grads`, as training does: that is where
the LayerNorm gradients of the sequence chunks are summed over the TP group. Run by
tests/models/test_sequence_parallel.py; writes result files that the tests compare.
"""

from megatron.core import parallel_state as ps
from megatron.core.distributed import finalize_model_grads

from common import mark_done, named_full, parse_out_dir, save_rank0, tiny_model_config
from megatron_lcl.config import LossConfig, ParallelConfig
from megatron_lcl.losses import LCLLoss
from megatron_lcl.models.lcl_model import LCLModel
from megatron_lcl.runtime import initialize_distributed, initialize_model_parallel, set_seed
from megatron_lcl.testing import random_batch
from megatron_lcl.training.pipeline import forward_loss, wrap_ddp

SEED = 1234
CFG = tiny_model_config()  # dropout off: SP draws dropout masks per sequence chunk (not comparable)
M = CFG.vision.num_image_tokens
# 4 samples, ragged images, one at position 0 (excluded from L_con); seq 48 splits over 2 ranks.
BATCH = random_batch([[0, 20], [9], [30], []], seq_length=48, num_image_tokens=M, image_size=16,
                     vocab_size=192, seed=7, pad_from=[None, 40, None, 44])

def terms_dict(terms):
    return {k: v.detach().clone() for k, v in terms.metrics().items()}

def run_reference(out):
    """TP=1, one process, no DDP: the ground truth (every rank computes it; rank 0 saves)."""
    set_seed(SEED)
    model = LCLModel(CFG, ParallelConfig())
    terms = forward_loss(model, BATCH, LCLLoss(LossConfig()))
    terms.total.backward()
    save_rank0({"terms": terms_dict(terms), "grads": named_full(model, None, "grad")}, out, "reference.pt")

def run_tp2(out, sequence_parallel: bool):
    parallel = ParallelConfig(tensor_model_parallel_size=2, sequence_parallel=sequence_parallel)
    initialize_model_parallel(parallel, SEED)
    set_seed(SEED)
    model = LCLModel(CFG, parallel)
    ddp = wrap_ddp(model, parallel)
    ddp.zero_grad_buffer()
    terms = forward_loss(ddp, BATCH, LCLLoss(LossConfig(), ps.get_data_parallel_group()))
    terms.total.backward()
    finalize_model_grads([ddp])
    tp = ps.get_tensor_model_parallel_group()
    flags = {"lm_sp": model.lm.config.sequence_parallel, "vit_sp": model.vision.config.sequence_parallel,
             "ln_marked": bool(getattr(model.lm.decoder.final_layernorm.weight, "sequence_parallel", False))}
    save_rank0({"terms": terms_dict(terms), "grads": named_full(ddp, tp, "main_grad"), "flags": flags},
               out, f"tp2{'_sp' if sequence_parallel else ''}.pt")

def main():
    out = parse_out_dir()
    initialize_distributed(ParallelConfig(), SEED)
    run_reference(out)
    run_tp2(out, sequence_parallel=False)
    run_tp2(out, sequence_parallel=True)
    mark_done(out)

if __name__ == "__main__":
    main()
