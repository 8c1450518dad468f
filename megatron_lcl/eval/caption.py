"""Captioning transfer (paper Appendix A.2, Fig. 3c): the pre-trained vision encoder, a new MLP
projector and a pre-trained causal language model (any HF `AutoModelForCausalLM` folder: the OPT that
`tools/checkpoint/convert_to_hf.py` exports, or a user's LLM). The M latents of an image, projected
to the LM width, are the LM's prefix; the caption follows and is learned with next-token
cross-entropy. `frozen`: the encoder is fixed (bitwise checked); `full`: it trains at `--encoder-lr`.
The LM trains at `--lr` unless `--no-train-lm` (then only the projector learns). A trained (`full`)
encoder gets stochastic depth `--drop-path` (Table 8: 0.2), rising linearly over its layers as in
pre-training (`apply_drop_path`); the frozen one runs in eval mode, without it.

    python -m megatron_lcl.eval.caption --encoder runs/NAME/checkpoints --lm runs/NAME/hf/lm \
        --data /data/laion_coco_10m/{00000..00999}.tar --eval-data coco/dataset_coco.json \
        --image-root coco --preset paper --checkpoint out/cap.pt --output out/cap.json
    # --data: webdataset shards (image + .txt), a .jsonl of {"image", "caption"}, or a Karpathy JSON
    # (its train + restval split, every caption a pair); --eval-data: Karpathy JSON (its --eval-split,
    # default test), COCO-format captions (NoCaps val) or pairs. With --output out/cap.json every
    # generated caption goes to out/cap.predictions.<test set>.json, COCO result format
    # [{"image_id", "caption"}] (image_id: cocoid / COCO id; for pairs sets the image's file).

Decoding is greedy (`--num-beams 1`) or beam search; scores are CIDEr and BLEU-4 from pycocoevalcap
(caption_metrics.py: PTB tokenizer when Java is present, else a Python tokenizer, named in the output).
"""

import argparse
import os
import sys
import time
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F

from transformers import AutoModelForCausalLM, AutoTokenizer

from megatron_lcl.eval.bad_samples import BadSampleLog
from megatron_lcl.eval.caption_metrics import caption_scores
from megatron_lcl.eval.cli import (Command, TaskData, add_config_args, common_args, entry_points,
                                   parse_with_preset)
from megatron_lcl.eval.datasets import CaptionedImages, LabeledImages
from megatron_lcl.eval.encoders import VisionEncoder, frozen_guard
from megatron_lcl.eval.engine import EngineConfig, TransferModel, autocast, fit
from megatron_lcl.eval.errors import InputError
from megatron_lcl.eval.karpathy import test_sets, training_pairs
from megatron_lcl.eval.parallel import all_gather_objects, all_sum, eval_batches, merge_bad_logs, one_process
from megatron_lcl.runtime.device import device as compute_device
from megatron_lcl.runtime.layout import ParallelLayout

# Paper Table 8 / A.2 (captioning): LAION-COCO 10M, 20k steps of 512, AdamW lr 1e-4 (one rate, the
# encoder's too in full mode), wd 1e-4, betas (0.9, 0.95), 1000 warm-up steps, cosine, drop path 0.2
# on the encoder (the default here).
PRESETS = {"paper": dict(steps=20000, batch_size=512, lr=1e-4, encoder_lr=1e-4, weight_decay=1e-4,
                         adam_beta2=0.95, warmup_steps=1000, drop_path=0.2)}


@dataclass
class CaptionConfig(EngineConfig):
    mode: str = "frozen"  # frozen | full (the vision encoder)
    epochs: int = 3
    batch_size: int = 32
    lr: float = 1e-4  # projector and (train_lm) the language model
    encoder_lr: float = 1e-5  # full mode only
    drop_path: float = 0.2  # full mode only: the encoder's stochastic depth at its last layer (Table 8)
    weight_decay: float = 1e-4
    warmup_epochs: float = 0.0
    train_lm: bool = True
    max_caption_tokens: int = 40
    max_new_tokens: int = 30
    num_beams: int = 1  # 1: greedy
    metric_tokenizer: str = "auto"  # auto (PTB if Java is present) | ptb | python
    seed: int = 0


class CaptionHead(torch.nn.Module):
    """latents `[b, M, h]` -> MLP -> prefix `[b, M, d]`; the LM reads prefix + caption embeddings."""

    def __init__(self, hidden_size: int, lm: torch.nn.Module, train_lm: bool):
        super().__init__()
        width = lm.get_input_embeddings().embedding_dim
        self.projector = torch.nn.Sequential(torch.nn.Linear(hidden_size, width), torch.nn.GELU(),
                                             torch.nn.Linear(width, width))
        self.lm = lm
        self.lm.requires_grad_(train_lm)

    def forward(self, latents: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        """Next-token CE over the caption tokens -> (loss sum, number of target tokens)."""
        prefix = self.projector(latents)  # [b, M, d]
        b, m, _ = prefix.shape
        embeds = torch.cat([prefix, self.lm.get_input_embeddings()(input_ids)], dim=1)  # [b, M+T, d]
        mask = torch.cat([attention_mask.new_ones(b, m), attention_mask], dim=1)  # [b, M+T]
        logits = self.lm(inputs_embeds=embeds, attention_mask=mask).logits  # [b, M+T, V]
        predictions = logits[:, m - 1:-1].float()  # position M-1+t predicts caption token t: [b, T, V]
        targets = input_ids.masked_fill(attention_mask == 0, -100)  # [b, T]
        loss_sum = F.cross_entropy(predictions.reshape(-1, predictions.shape[-1]), targets.reshape(-1),
                                   ignore_index=-100, reduction="sum")
        return loss_sum, (targets != -100).sum()


def apply_drop_path(encoder: VisionEncoder, max_rate: float) -> None:
    """Stochastic depth on both residual branches of every encoder layer, the rate rising linearly from
    0 (first layer) to `max_rate` (last), as the ViT's pre-training schedule (`models.vision`); active in
    train mode only (the frozen encoder runs in eval mode: unaffected). A megatron_lcl ViT has it built
    in (`set_drop_path_rate`); a HF CLIPVisionModel gets it as forward hooks on each layer's attention
    and MLP outputs, whole samples dropped (`models.layers.drop_path`'s rule)."""
    if not 0.0 <= max_rate < 1.0:
        raise InputError(f"--drop-path {max_rate}: must be in [0, 1)")
    if encoder.kind == "megatron_lcl":
        encoder.module.set_drop_path_rate(max_rate)
    elif encoder.kind == "hf_clip":
        layers = getattr(encoder.module, "vision_model", encoder.module).encoder.layers  # transformers < 5 nests it
        for i, layer in enumerate(layers):
            rate = max_rate * i / max(len(layers) - 1, 1)
            for branch in (layer.self_attn, layer.mlp):
                if not hasattr(branch, "drop_path_rate"):
                    branch.register_forward_hook(_drop_path_hook)
                branch.drop_path_rate = rate
    elif max_rate > 0:
        raise InputError(f"--drop-path {max_rate}: the encoder ({encoder.kind}: {encoder.source}) has no layers "
                         f"to drop (megatron_lcl ViTs and HF CLIP towers do): give --drop-path 0")


def _drop_path_hook(branch: torch.nn.Module, inputs, output):
    """A CLIP layer's residual branch output (`[b, s, h]`, attention's as `(out, weights)`) with whole
    samples dropped at `branch.drop_path_rate` in train mode (`drop_path` takes `[s, b, h]`)."""
    from megatron_lcl.models.layers import drop_path

    def drop(x):  # [b, s, h]
        return drop_path(x.transpose(0, 1), branch.drop_path_rate, branch.training).transpose(0, 1)

    return (drop(output[0]),) + tuple(output[1:]) if isinstance(output, tuple) else drop(output)


def tokenize_captions(tokenizer, captions: List[str], max_tokens: int):
    """Caption tokens + EOS, right-padded -> input_ids, attention_mask `[b, T]` (no BOS: the image
    prefix starts the sequence)."""
    rows = [tokenizer(c, add_special_tokens=False)["input_ids"][:max_tokens - 1] + [tokenizer.eos_token_id]
            for c in captions]
    width = max((len(r) for r in rows), default=1)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)], mask[i, :len(r)] = torch.tensor(r), 1
    return ids, mask


def caption_step(model, batch: dict, tokenizer, cfg: CaptionConfig, layout: ParallelLayout, seen: dict) -> torch.Tensor:
    """CE over every caption token of the global batch: local sum x world / global token count.
    `seen["caption_tokens"]` adds up the global batch's caption tokens (EOS not counted)."""
    ids, mask = tokenize_captions(tokenizer, batch.get("captions", []), cfg.max_caption_tokens)
    device = compute_device()
    loss_sum, count = model(batch["inputs"].to(device), ids.to(device), mask.to(device))
    total, captions = all_sum([float(count), float(mask.sum() - len(mask))], layout)
    seen["caption_tokens"] = seen.get("caption_tokens", 0.0) + captions
    return loss_sum * layout.dp_size / max(total, 1.0)


@torch.no_grad()
def generate(model: TransferModel, pixels: torch.Tensor, tokenizer, cfg: CaptionConfig) -> List[str]:
    """Greedy (num_beams=1) or beam-search captions of `pixels [b, 3, S, S]` (HF `generate` on the
    projected prefix as `inputs_embeds`)."""
    head = model.head
    prefix = head.projector(model.latents(pixels))  # [b, M, d]
    mask = torch.ones(prefix.shape[:2], dtype=torch.long, device=prefix.device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = head.lm.generate(inputs_embeds=prefix.to(head.lm.dtype), attention_mask=mask, do_sample=False,
                           max_new_tokens=cfg.max_new_tokens, num_beams=cfg.num_beams,
                           eos_token_id=tokenizer.eos_token_id, pad_token_id=pad)
    return [t.strip() for t in tokenizer.batch_decode(out, skip_special_tokens=True)]


def references_of(test_set) -> Dict[int, List[str]]:
    refs: Dict[int, List[str]] = {}
    for caption, i in zip(test_set.captions, test_set.text_to_image.tolist()):
        refs.setdefault(int(i), []).append(caption)
    return refs


def caption_test_set(model: TransferModel, test_set, tokenizer, cfg: CaptionConfig, layout: ParallelLayout,
                     bad: BadSampleLog) -> Dict[int, str]:
    """{image index: generated caption} over all ranks (each rank captions its shard)."""
    model.eval()
    mine = {}
    for batch in eval_batches(LabeledImages(test_set, model.encoder.image_size), 64, layout, cfg.num_workers):
        bad.extend(batch["bad"])
        if len(batch["index"]):
            with autocast(cfg.precision):
                texts = generate(model, batch["inputs"].to(compute_device()), tokenizer, cfg)
            mine.update(zip(batch["index"].tolist(), texts))
    return {i: c for part in all_gather_objects(mine, layout) for i, c in part.items()}


def score_test_set(model, test_set, tokenizer, cfg: CaptionConfig, layout: ParallelLayout, bad: BadSampleLog) -> dict:
    """CIDEr / BLEU-4 over the images that could be read, a few examples, and every prediction
    (`predictions`: COCO result format, [{"image_id", "caption"}] in image order)."""
    hypotheses = caption_test_set(model, test_set, tokenizer, cfg, layout, bad)
    references = {i: r for i, r in references_of(test_set).items() if i in hypotheses}
    scores = caption_scores(references, hypotheses, cfg.metric_tokenizer) if layout.rank == 0 else {}
    examples = [{"image": test_set.origin(i), "caption": hypotheses[i], "references": references[i][:2]}
                for i in sorted(hypotheses)[:5]]
    predictions = [{"image_id": _json_id(test_set.image_ids[i]), "caption": hypotheses[i]} for i in sorted(hypotheses)]
    return dict(scores, examples=examples, predictions=predictions)


def _json_id(image_id):
    return image_id.item() if hasattr(image_id, "item") else image_id


def load_tokenizer(path: str):
    """The tokenizer of a HF causal LM folder (an InputError naming the folder when there is none)."""
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise InputError(f"--lm {path}: no HF language model here (no config.json)")
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, KeyError) as e:
        raise InputError(f"--lm {path}: no loadable tokenizer ({type(e).__name__}: "
                         f"{(str(e).strip().splitlines() or [''])[0]})") from None


def load_lm(path: str, train_source=None):
    """Any HF causal LM folder (config + weights + tokenizer) -> (model in float32, tokenizer). With
    `train_source`, the tokenizer is checked on its captions before the weights load (`check_tokenizer`)."""
    tokenizer = load_tokenizer(path)
    if train_source is not None:
        check_tokenizer(tokenizer, path, train_source)
    try:
        lm = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    except (OSError, ValueError, KeyError) as e:
        raise InputError(f"--lm {path}: not loadable as a HF causal LM ({type(e).__name__}: "
                         f"{(str(e).strip().splitlines() or [''])[0]})") from None
    vocab = lm.get_input_embeddings().num_embeddings
    if tokenizer.eos_token_id is None:
        raise InputError(f"--lm {path}: the tokenizer has no EOS token (needed to end captions)")
    if len(tokenizer) > vocab:
        raise InputError(f"--lm {path}: the tokenizer has {len(tokenizer)} tokens, more than the model's vocabulary "
                         f"({vocab}): it does not belong to this model")
    return lm, tokenizer


def check_lm(path: str, train_source) -> None:
    """`load_lm`'s checks that need no weights (the CLI runs them before anything loads)."""
    check_tokenizer(load_tokenizer(path), path, train_source)


def check_tokenizer(tokenizer, lm_path: str, source, samples: int = 64) -> None:
    """Refuse a tokenizer that turns the training captions into no tokens (e.g. an LM folder without
    tokenizer files, where AutoTokenizer builds an empty tokenizer: the run would learn only EOS and
    caption nothing). Judged on up to `samples` captions spread over the training source."""
    picks = sorted({round(k * (len(source) - 1) / max(1, samples - 1)) for k in range(min(samples, len(source)))})
    captions = [c for c in (source.caption(i) for i in picks) if c.strip()]
    if not captions:
        return  # nothing to judge the tokenizer by; caption_step's count decides after training
    if not any(tokenizer(c, add_special_tokens=False)["input_ids"] for c in captions):
        files = sorted(n for n in os.listdir(lm_path) if n.startswith(("tokenizer", "vocab", "merges", "spiece"))
                       or n.endswith(".model"))
        raise InputError(f"--lm {lm_path}: its tokenizer turns every caption into no tokens (e.g. {captions[0]!r} "
                         f"-> []; {len(tokenizer)} tokens in its vocabulary; tokenizer files here: {files or 'none'})")


def run_captioning(encoder: VisionEncoder, lm_path: str, train_source, test_sets: list, cfg: CaptionConfig,
                   layout: Optional[ParallelLayout] = None, checkpoint: Optional[str] = None) -> dict:
    """Train projector (+ LM, + encoder in full mode) on caption pairs, data-parallel; score each test set.
    Refuses (InputError) an LM whose tokenizer cannot encode the captions, and a run in which every
    training target was empty (only EOS)."""
    layout = layout or one_process()
    lm, tokenizer = load_lm(lm_path, train_source)
    torch.manual_seed(cfg.seed)  # equal projector initialisation on every rank
    if cfg.mode == "full":
        apply_drop_path(encoder, cfg.drop_path)
    model = TransferModel(encoder, CaptionHead(encoder.hidden_size, lm, cfg.train_lm), cfg.mode)
    train_bad, test_bad, seen = BadSampleLog(), BadSampleLog(), {}
    with frozen_guard(encoder, cfg.mode) as guard:
        t0 = time.time()
        fit(model, CaptionedImages(train_source, encoder.image_size),
            lambda m, b: caption_step(m, b, tokenizer, cfg, layout, seen), cfg, layout, train_bad, checkpoint,
            "caption")
        if seen and not seen["caption_tokens"]:
            raise InputError(f"--lm {lm_path}: every training target was empty (each caption tokenized to no tokens, "
                             f"only EOS was learned): check the training captions and the LM's tokenizer")
        by_set = {t.name: score_test_set(model, t, tokenizer, cfg, layout, test_bad) for t in test_sets}
    predictions = {name: scores.pop("predictions") for name, scores in by_set.items()}
    return {"task": "captioning", "encoder": encoder.source, "encoder_kind": encoder.kind, "lm": lm_path,
            "scores_by_set": by_set, "num_train": len(train_source), "encoder_unchanged": guard.unchanged,
            "time_s": round(time.time() - t0, 1), "world_size": layout.dp_size,
            "bad_samples": {"train_index": train_source.problems.as_dict(),
                            "test_index": {t.name: t.problems.as_dict() for t in test_sets},
                            "train_read": merge_bad_logs(train_bad, layout),
                            "test_read": merge_bad_logs(test_bad, layout)},
            "config": asdict(cfg), "predictions_by_set": predictions, "_model": model, "_tokenizer": tokenizer}


# ------------------------------------------------------------------------------------------ command line

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--encoder", required=True, help="megatron_lcl checkpoint or HF CLIPVisionModel folder")
    p.add_argument("--lm", required=True, help="HF AutoModelForCausalLM folder (with its tokenizer)")
    p.add_argument("--data", required=True, nargs="+",
                   help="caption pairs: webdataset shards, a .jsonl, or a Karpathy JSON (train + restval)")
    p.add_argument("--eval-data", required=True, nargs="+",
                   help="Karpathy JSON (COCO test), COCO-format captions (NoCaps val), or pairs")
    p.add_argument("--eval-split", default="test", help="the Karpathy split to test on (test, val)")
    p.add_argument("--image-root", help="folder the JSON files' image paths are relative to (default: the JSON's)")
    add_config_args(p, CaptionConfig)
    common_args(p)  # --output: the results JSON, and every prediction beside it
    return parse_with_preset(p, argv, PRESETS)


def load_data(args) -> TaskData:
    train = training_pairs(args.data, args.image_root)
    tests = test_sets(args.eval_data, args.image_root, args.eval_split)
    return TaskData(train, tests, {t.name: t for t in tests})


def run(args, encoder: VisionEncoder, data: TaskData, cfg: CaptionConfig, layout: ParallelLayout) -> dict:
    return run_captioning(encoder, args.lm, data.train, data.tests, cfg, layout, args.checkpoint)


def summary(result: dict) -> str:
    tokenizers = {s.get("tokenizer") for s in result["scores_by_set"].values()}
    return (f"{result['num_train']} training pairs, {result['time_s']} s; metric tokenizer: {', '.join(tokenizers)}; "
            f"encoder weights unchanged: {result['encoder_unchanged']}")


COMMAND = Command(parse_args, CaptionConfig, ("encoder", "lm", "data", "eval_data", "image_root"), load_data, run,
                  summary, before_loading=lambda args, data: check_lm(args.lm, data.train))  # a bad --lm: at once


run_command_line, main = entry_points(COMMAND)  # `python -m megatron_lcl.eval.caption`, the console script


if __name__ == "__main__":
    sys.exit(main())
