"""Shared by the multi-rank check scripts (run under torchrun by tests/test_*_parallel.py)."""

import argparse
import json
import os

import torch
import torch.distributed as dist

from megatron_lcl.config import HeadsConfig, LMConfig, ModelConfig, VisionConfig


def tiny_model_config(**vision_overrides) -> ModelConfig:
    vision = dict(image_size=16, patch_size=8, hidden_size=32, num_layers=2, num_attention_heads=4,
                  ffn_hidden_size=64, layer_scale_init=0.5, drop_path_rate=0.0)
    vision.update(vision_overrides)
    return ModelConfig(
        vision=VisionConfig(**vision),
        lm=LMConfig(hidden_size=32, num_layers=4, num_attention_heads=4, ffn_hidden_size=64,
                    max_position_embeddings=64, vocab_size=192, make_vocab_size_divisible_by=16),
        heads=HeadsConfig(embed_dim=16, pool_num_heads=4), transformer_impl="local")


def parse_out_dir() -> str:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    return parser.parse_args().out


def full_tensor(t: torch.Tensor, param: torch.nn.Parameter, tp_group) -> torch.Tensor:
    """Gather a tensor-parallel shard (of a param or its grad) to the full TP=1 shape."""
    if tp_group is None or not getattr(param, "tensor_model_parallel", False):
        return t.detach().clone()
    return gather_cat(t.detach(), tp_group, param.partition_dim)


def gather_cat(t: torch.Tensor, group, dim: int) -> torch.Tensor:
    """All-gather `t` over `group` and concatenate the parts along `dim`."""
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def named_full(model, tp_group, what: str = "param") -> dict:
    """{name: full tensor} for every parameter (`what` = param | grad | main_grad)."""
    out = {}
    for name, p in model.named_parameters():
        name = name.removeprefix("module.")
        t = {"param": p.data, "grad": p.grad, "main_grad": getattr(p, "main_grad", None)}[what]
        if t is None:
            t = torch.zeros_like(p.data)
        out[name] = full_tensor(t, p, tp_group)
    return out


def mark_done(out_dir: str) -> None:
    """After every rank got here, rank 0 writes OUT/done: what tests/multirank.py waits for."""
    dist.barrier()
    if dist.get_rank() == 0:
        open(os.path.join(out_dir, "done"), "w").close()


def save_rank0(obj, out_dir: str, name: str) -> None:
    if dist.get_rank() == 0:
        torch.save(obj, os.path.join(out_dir, name))


def save_json_rank0(obj, out_dir: str, name: str) -> None:
    if dist.get_rank() == 0:
        with open(os.path.join(out_dir, name), "w") as f:
            json.dump(obj, f, indent=1)


def global_name(name: str, model) -> str:
    """Parameter name with the LM layer index made global (pipeline stages number layers locally)."""
    name = name.removeprefix("module.")
    prefix = "lm.decoder.layers."
    if not name.startswith(prefix):
        return name
    stage = model.module if hasattr(model, "module") else model
    offset = stage.lm.decoder.layers[0].layer_number - 1
    index, rest = name[len(prefix):].split(".", 1)
    return f"{prefix}{int(index) + offset}.{rest}"


def load_full_weights(model, full: dict, tp_rank: int, tp_size: int) -> None:
    """Copy TP=1/PP=1 weights into this rank's (TP-sharded, pipeline-stage) model."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            key = global_name(name, model)
            if key == "lm.output_layer.weight":  # tied copy on the last stage
                key = "lm.embedding.word_embeddings.weight"
            t = full[key]
            if getattr(p, "tensor_model_parallel", False):
                t = t.chunk(tp_size, dim=p.partition_dim)[tp_rank]
            p.copy_(t)


def collect_full(model, tp_group, what: str) -> dict:
    """{global name: full tensor} of this stage, merged over all pipeline stages on every rank."""
    mine = {global_name(n, model): t for n, t in named_full(model, tp_group, what).items()
            if not n.removeprefix("module.").startswith("lm.output_layer.")}
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    merged = {}
    for d in everyone:
        merged.update(d)
    return merged


ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY_YAML = os.path.join(ROOT, "examples", "configs", "tiny_cpu.yaml")


def tiny_run_config(out: str, run: str, *overrides: str):
    """The tiny model of examples/configs/tiny_cpu.yaml on the corpus tests/training/test_training.py builds in
    `out` (shards/, tokenizer/), run dir `out/run`: 4 steps of 2 x 2 sequences of 64 tokens, quiet,
    no periodic saves. `overrides` (section.key=value) win."""
    from megatron_lcl.config import load_config

    return load_config(TINY_YAML, [
        f"run_dir={os.path.join(out, run)}", f"data.path={os.path.join(out, 'shards')}",
        f"data.tokenizer={os.path.join(out, 'tokenizer', 'lcl.model')}", "data.seq_length=64",
        "data.micro_batch_size=2", "data.num_workers=0", "data.shuffle_buffer=8",
        "train.global_batch_size=4", "train.train_steps=4", "train.drop_path_ramp_steps=2",
        "optimizer.warmup_steps=1", "logging.log_interval=1", "logging.console=false",
        "logging.tensorboard=false", "checkpoint.save_interval=null", *overrides])
