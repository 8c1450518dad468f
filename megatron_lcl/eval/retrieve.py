"""Image-text retrieval transfer (paper Appendix A.2): the vision encoder (frozen or full) + a new
attention pooling and linear projection, and a new small text encoder (causal transformer, final-token
feature, linear projection), trained contrastively on image-caption pairs; image->text (TR) and
text->image (IR) recall@1/5/10 on held-out pairs, in percent.

    python -m megatron_lcl.eval.retrieve --encoder runs/tiny/checkpoints --data data/synth_eval
    python -m megatron_lcl.eval.retrieve --encoder hf_out/vision --data pairs.jsonl --mode full \
        --eval-data test_pairs.jsonl --output results/ret.json
    python -m megatron_lcl.eval.retrieve --encoder hf_out --data coco/dataset_coco.json --image-root coco
    # --data: a synthetic corpus (each image and its matched sentence), webdataset shards
    # (image + .txt), a .jsonl of {"image": path, "caption": text}, or a Karpathy JSON (its train +
    # restval split, every caption a pair); held out: --eval-data (a Karpathy JSON's --eval-split,
    # default test), the Karpathy --data's --eval-split, or a seeded --eval-fraction split.

Data-parallel under torchrun (the contrastive negatives of every rank), resumable with --checkpoint;
unreadable images are skipped, counted and named.

Text is tokenized by words (lower-cased, punctuation split off) with a vocabulary built from the
training captions; each caption ends with an end token whose output is the text feature.
Ranks count ties against the model (a candidate scoring equal to the correct one ranks above it),
so a collapsed encoder whose similarities are all equal scores 0, never 100. Duplicate captions (a
test set where several images share one caption, as the synthetic scenes do): with
--same-caption-matches an identical caption (case and spacing aside) is a correct match, so images
sharing a caption are interchangeable; without it (the default, as Karpathy COCO scorers) only an
image's own captions count, and the ceiling of TR@1 is the share of images with a unique caption.
The result's `_per_item` (Python callers) holds each test image's TR and IR rank.
"""

import argparse
import re
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

from megatron_lcl.eval.bad_samples import BadSampleLog
from megatron_lcl.eval.classify import default_pool_heads
from megatron_lcl.eval.cli import (Command, TaskData, add_config_args, common_args, entry_points,
                                   parse_with_preset)
from megatron_lcl.eval.datasets import CaptionedImages, LabeledImages
from megatron_lcl.eval.encoders import VisionEncoder, frozen_guard
from megatron_lcl.eval.engine import EngineConfig, TransferModel, fit
from megatron_lcl.eval.karpathy import (CaptionPairs, as_test_set, load_captioned_test_set, test_sets,
                                        training_pairs)
from megatron_lcl.eval.parallel import (all_gather_objects, contrastive_group, eval_batches, merge_bad_logs,
                                        one_process)
from megatron_lcl.eval.report import KS
from megatron_lcl.eval.sources import SubsetSource, split
from megatron_lcl.losses.contrastive import contrastive_loss_sum
from megatron_lcl.models.heads import AttentionPooling
from megatron_lcl.runtime.device import device as compute_device
from megatron_lcl.runtime.layout import ParallelLayout

# Paper Table 8 / A.2 (retrieval): CC12M + CC3M + SBU, 5000 steps of 16k pairs, AdamW lr 1e-3 (new
# parameters) and 1e-5 (pre-trained), wd 1e-4, betas (0.9, 0.95), 500 warm-up steps, cosine.
PRESETS = {"paper": dict(steps=5000, batch_size=16384, lr=1e-3, encoder_lr=1e-5, weight_decay=1e-4,
                         adam_beta2=0.95, warmup_steps=500)}


@dataclass
class RetrievalConfig(EngineConfig):
    mode: str = "frozen"  # frozen | full
    epochs: int = 30
    batch_size: int = 64  # contrastive batch: negatives are the other pairs in it
    lr: float = 1e-3  # new parameters (pooling, projections, text encoder)
    encoder_lr: float = 1e-5  # pre-trained parameters, full mode only
    weight_decay: float = 0.1
    warmup_epochs: float = 1.0
    embed_dim: int = 128
    text_width: int = 128
    text_layers: int = 2
    text_heads: int = 4
    max_text_tokens: int = 48
    max_vocab: int = 20000
    vocab_captions: int = 200000  # the word vocabulary comes from this many training captions
    seed: int = 0
    # the duplicate-caption rule: True counts a caption identical to the image's own (case and spacing
    # aside) as a match, so images that share a caption are interchangeable (`correct_pairs`); False
    # (the Karpathy / CLIP_benchmark convention) counts only the image's own captions
    same_caption_matches: bool = False


# ------------------------------------------------------------------------------------------ metrics

def caption_key(text: str) -> str:
    """What makes two captions "the same" under the duplicate-caption rule: lower-cased words."""
    return " ".join(text.lower().split())


def correct_pairs(text_to_image: torch.Tensor, n_images: int, captions: Optional[Sequence[str]] = None) -> torch.Tensor:
    """`[n_images, n_texts]` bool: which (image, text) pairs count as a match.

    Without `captions`: text j matches only the image it belongs to (`text_to_image[j]`). With the
    texts' `captions` (the duplicate-caption rule): text j also matches every image that has a caption
    identical to it (`caption_key`): in a set where several images share one caption, retrieving any of
    them is correct, so ties between identical captions count as hits, not misses."""
    own = text_to_image[None, :] == torch.arange(n_images)[:, None]  # [n_images, n_texts]
    if captions is None:
        return own
    text_class = caption_classes(captions)
    has_class = torch.zeros(n_images, int(text_class.max()) + 1, dtype=torch.bool)  # [n_images, n_classes]
    has_class[text_to_image, text_class] = True
    return has_class[:, text_class]  # [n_images, n_texts]


def caption_classes(captions: Sequence[str]) -> torch.Tensor:
    """`[n_texts]` the index of each text's distinct caption (`caption_key`), in order of first use."""
    keys = {}
    return torch.tensor([keys.setdefault(caption_key(c), len(keys)) for c in captions], dtype=torch.long)


def retrieval_ranks(similarity: torch.Tensor, text_to_image: torch.Tensor,
                    captions: Optional[Sequence[str]] = None):
    """(image_rank `[n_images]`, text_rank `[n_texts]`) from `similarity [n_images, n_texts]`: the number
    of wrong candidates scoring >= the best correct one (ties in score count against the model; which
    pairs are correct: `correct_pairs`). Rank 0 is a top-1 hit. With `captions`, the candidates of
    image->text retrieval are the distinct captions: a wrong caption that several texts repeat counts
    once (else a caption used by five test images would fill a top 5 alone)."""
    n_images, n_texts = similarity.shape
    assert text_to_image.shape == (n_texts,), f"text_to_image {tuple(text_to_image.shape)} vs {n_texts} texts"
    correct = correct_pairs(text_to_image, n_images, captions)  # [n_images, n_texts]
    assert correct.any(dim=1).all(), "every image needs at least one caption"
    best_text = similarity.masked_fill(~correct, float("-inf")).max(dim=1).values  # [n_images]
    wrong_above = (similarity >= best_text[:, None]) & ~correct  # [n_images, n_texts]
    if captions is not None:  # one candidate per distinct caption: [n_images, n_classes] -> count
        text_class = caption_classes(captions).expand(n_images, -1)
        wrong_above = torch.zeros(n_images, int(text_class.max()) + 1, dtype=torch.long).scatter_add_(
            1, text_class, wrong_above.long()) > 0
    image_rank = wrong_above.sum(dim=1)
    best_image = similarity.masked_fill(~correct, float("-inf")).max(dim=0).values  # [n_texts]
    text_rank = ((similarity >= best_image[None, :]) & ~correct).sum(dim=0)
    return image_rank, text_rank


def recall_at_k(similarity: torch.Tensor, text_to_image: torch.Tensor, ks: Sequence[int] = KS,
                captions: Optional[Sequence[str]] = None) -> Dict[str, float]:
    """Retrieval recall in percent from `similarity [n_images, n_texts]`; `text_to_image[j]` is the image
    caption j belongs to (an image may have several captions, COCO-style).

    TR@k (image->text): an image is a hit when one of its captions ranks in its top k texts.
    IR@k (text->image): a caption is a hit when its image ranks in its top k images.
    A rank counts the wrong candidates scoring >= the correct one (ties count against the model).
    With `captions` (one per text), identical captions are interchangeable (`correct_pairs`).
    """
    return recall_from_ranks(*retrieval_ranks(similarity, text_to_image, captions), ks)


def recall_from_ranks(image_rank: torch.Tensor, text_rank: torch.Tensor, ks: Sequence[int] = KS) -> Dict[str, float]:
    """TR@k / IR@k in percent: the share of images / texts whose rank is below k."""
    out = {f"TR@{k}": 100.0 * (image_rank < k).float().mean().item() for k in ks}
    out.update({f"IR@{k}": 100.0 * (text_rank < k).float().mean().item() for k in ks})
    return out


# ------------------------------------------------------------------------------------------ text side

class WordTokenizer:
    """Lower-cased words and punctuation; ids: 0 pad, 1 unknown, 2 end; vocabulary from training text."""

    PAD, UNK, END = 0, 1, 2

    def __init__(self, vocab: List[str]):
        self.vocab = vocab
        self.index = {w: i for i, w in enumerate(vocab)}

    @staticmethod
    def words(text: str) -> List[str]:
        return re.findall(r"[a-z0-9]+|[^\sa-z0-9]", text.lower())

    @classmethod
    def fit(cls, texts: Sequence[str], max_vocab: int) -> "WordTokenizer":
        counts = Counter(w for t in texts for w in cls.words(t))
        return cls(["<pad>", "<unk>", "<end>"] + [w for w, _ in counts.most_common(max_vocab - 3)])

    def __call__(self, texts: Sequence[str], max_tokens: int) -> torch.Tensor:
        """`[n, max_tokens]` ids, right-padded; the last kept token of every row is the end token."""
        out = torch.full((len(texts), max_tokens), self.PAD, dtype=torch.long)
        for i, text in enumerate(texts):
            ids = [self.index.get(w, self.UNK) for w in self.words(text)][:max_tokens - 1] + [self.END]
            out[i, :len(ids)] = torch.tensor(ids)
        return out


class TextEncoder(torch.nn.Module):
    """Token + learned position embeddings -> causal pre-LN transformer -> LayerNorm -> the end token's
    output -> Linear -> `[n, embed_dim]` (causal: positions before the end token never see padding)."""

    def __init__(self, vocab_size: int, cfg: RetrievalConfig):
        super().__init__()
        self.token_embedding = torch.nn.Embedding(vocab_size, cfg.text_width)
        self.position_embedding = torch.nn.Parameter(torch.randn(cfg.max_text_tokens, cfg.text_width) * 0.01)
        layer = torch.nn.TransformerEncoderLayer(cfg.text_width, cfg.text_heads, 4 * cfg.text_width,
                                                 dropout=0.0, activation="gelu", batch_first=True,
                                                 norm_first=True)
        self.layers = torch.nn.TransformerEncoder(layer, cfg.text_layers, enable_nested_tensor=False)
        self.norm = torch.nn.LayerNorm(cfg.text_width)
        self.proj = torch.nn.Linear(cfg.text_width, cfg.embed_dim, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        lengths = (tokens != WordTokenizer.PAD).sum(dim=1)  # [b], end token included
        tokens = tokens[:, :int(lengths.max())]  # drop the padding columns no caption reaches
        b, s = tokens.shape  # [b, s]
        x = self.token_embedding(tokens) + self.position_embedding[:s]  # [b, s, w]
        causal = torch.nn.Transformer.generate_square_subsequent_mask(s)
        x = self.norm(self.layers(x, mask=causal, is_causal=True))
        return self.proj(x[torch.arange(b), lengths - 1])  # the end token's output


class ImageTower(torch.nn.Module):
    """New attention pooling over the encoder's latents `[n, M, h]` -> Linear -> `[n, embed_dim]`."""

    def __init__(self, hidden_size: int, embed_dim: int):
        super().__init__()
        self.pool = AttentionPooling(hidden_size, default_pool_heads(hidden_size))
        self.proj = torch.nn.Linear(hidden_size, embed_dim, bias=False)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.proj(self.pool(latents))


class RetrievalModel(torch.nn.Module):
    def __init__(self, hidden_size: int, vocab_size: int, cfg: RetrievalConfig):
        super().__init__()
        self.image = ImageTower(hidden_size, cfg.embed_dim)
        self.text = TextEncoder(vocab_size, cfg)
        self.logit_scale = torch.nn.Parameter(torch.tensor(1 / 0.07).log())

    def forward(self, latents: torch.Tensor, tokens: torch.Tensor):
        """-> L2-normalised image features `[n, e]`, text features `[n, e]`, logit scale (<= 100)."""
        v = F.normalize(self.image(latents), dim=-1)
        t = F.normalize(self.text(tokens), dim=-1)
        return v, t, self.logit_scale.exp().clamp(max=100)


# ------------------------------------------------------------------------------------------ train / eval

def retrieval_step(model, batch: dict, tokenizer: WordTokenizer, cfg: RetrievalConfig, layout: ParallelLayout,
                   gather_group) -> torch.Tensor:
    """Symmetric InfoNCE with the negatives of every rank (`contrastive_loss_sum` over `gather_group`,
    ragged counts allowed); local sum x world / global count."""
    device = compute_device()
    tokens = tokenizer(batch.get("captions", []), cfg.max_text_tokens).to(device)  # [b, T]
    v, t, scale = model(batch["inputs"].to(device), tokens)  # [b, e], [b, e], []
    loss_sum, num_global, _ = contrastive_loss_sum(v.float(), t.float(), scale, gather_group)
    return loss_sum * layout.dp_size / max(num_global, 1)


def fit_tokenizer(source, cfg: RetrievalConfig) -> WordTokenizer:
    """Word vocabulary from the first `cfg.vocab_captions` training captions (the same on every rank)."""
    n = min(len(source), cfg.vocab_captions)
    return WordTokenizer.fit([source.caption(i) for i in range(n)], cfg.max_vocab)


@torch.no_grad()
def test_set_similarity(model: TransferModel, test_set, tokenizer: WordTokenizer, cfg: RetrievalConfig,
                        layout: ParallelLayout, bad: BadSampleLog):
    """Image embeddings computed shard-wise on the ranks and gathered; every caption embedded on each
    rank. Images that cannot be read are dropped with their captions.
    -> (similarity `[n_images_kept, n_texts_kept]`, text_to_image `[n_texts_kept]`, the kept captions,
    the kept images' test-set indices)."""
    model.eval()
    device = compute_device()
    mine = {}
    for batch in eval_batches(LabeledImages(test_set, model.encoder.image_size), 256, layout, cfg.num_workers):
        bad.extend(batch["bad"])
        if len(batch["index"]):
            v = F.normalize(model.head.image(model.latents(batch["inputs"].to(device))), dim=-1)
            mine.update(zip(batch["index"].tolist(), v.float().cpu()))
    image_emb = {i: e for part in all_gather_objects(mine, layout) for i, e in part.items()}
    kept = sorted(image_emb)  # image indices that were read
    new_index = torch.full((len(test_set),), -1, dtype=torch.long)
    new_index[kept] = torch.arange(len(kept))
    text_to_image = new_index[torch.as_tensor(test_set.text_to_image, dtype=torch.long)]
    texts = [c for c, k in zip(test_set.captions, text_to_image.tolist()) if k >= 0]
    tokens = tokenizer(texts, cfg.max_text_tokens)
    t = torch.cat([F.normalize(model.head.text(tokens[i:i + 512].to(device)), dim=-1).float().cpu()
                   for i in range(0, len(texts), 512)])
    return torch.stack([image_emb[i] for i in kept]) @ t.T, text_to_image[text_to_image >= 0], texts, kept


def ranked_test_set(similarity: torch.Tensor, text_to_image: torch.Tensor, texts: List[str], kept: List[int],
                    test_set, cfg: RetrievalConfig) -> dict:
    """Recall on one test set, and its per-item ranks (`_per_item`: each kept image's origin, its TR rank
    and the best IR rank of its captions; 0 is a top-1 hit) for paired comparisons across encoders."""
    captions = texts if cfg.same_caption_matches else None
    image_rank, text_rank = retrieval_ranks(similarity, text_to_image, captions)
    best_text_rank = torch.full((len(kept),), len(kept), dtype=torch.long).scatter_reduce(
        0, text_to_image, text_rank, "amin")  # [n_images]: the best-ranked of each image's captions
    out = recall_from_ranks(image_rank, text_rank)
    out.update(num_images=similarity.shape[0], num_captions=similarity.shape[1],
               num_distinct_captions=len({caption_key(t) for t in texts}),
               _per_item={"image": [test_set.origin(i) for i in kept], "tr_rank": image_rank.tolist(),
                          "ir_rank": best_text_rank.tolist()})
    return out


def run_retrieval(encoder: VisionEncoder, train_source, test_sets: list, cfg: RetrievalConfig,
                  layout: Optional[ParallelLayout] = None, checkpoint: Optional[str] = None) -> dict:
    """Contrastive transfer on `train_source`'s pairs (engine.fit, data-parallel over `layout`'s ranks,
    resumable from `checkpoint`), then TR/IR@k on each test set (Karpathy: 5 captions per image; TR
    counts a hit if any of the image's captions is in the top k, IR ranks the images for every
    caption). `recall_pct` is the first set's. Frozen mode raises RuntimeError if the encoder's weights
    changed (`frozen_guard`)."""
    layout = layout or one_process()
    gather_group = contrastive_group(layout)
    tokenizer = fit_tokenizer(train_source, cfg)
    torch.manual_seed(cfg.seed)  # equal head initialisation on every rank
    model = TransferModel(encoder, RetrievalModel(encoder.hidden_size, len(tokenizer.vocab), cfg), cfg.mode)
    train_bad, test_bad = BadSampleLog(), BadSampleLog()
    with frozen_guard(encoder, cfg.mode) as guard:
        t0 = time.time()
        fit(model, CaptionedImages(train_source, encoder.image_size),
            lambda m, b: retrieval_step(m, b, tokenizer, cfg, layout, gather_group), cfg, layout, train_bad,
            checkpoint, "retrieval")
        by_set = {}
        for test_set in test_sets:
            ranked = ranked_test_set(*test_set_similarity(model, test_set, tokenizer, cfg, layout, test_bad),
                                     test_set, cfg)
            by_set[test_set.name] = ranked
    per_item = by_set[test_sets[0].name].pop("_per_item")
    for ranked in by_set.values():
        ranked.pop("_per_item", None)
    first = by_set[test_sets[0].name]
    return {"task": "retrieval", "encoder": encoder.source, "encoder_kind": encoder.kind,
            "recall_pct": {k: v for k, v in first.items() if "@" in k}, "recall_by_set": by_set,
            "num_train": len(train_source), "num_eval": first["num_images"], "vocab_size": len(tokenizer.vocab),
            "encoder_unchanged": guard.unchanged, "time_s": round(time.time() - t0, 1), "world_size": layout.dp_size,
            "bad_samples": {"train_index": train_source.problems.as_dict(),
                            "test_index": {t.name: t.problems.as_dict() for t in test_sets},
                            "train_read": merge_bad_logs(train_bad, layout),
                            "test_read": merge_bad_logs(test_bad, layout)},
            "config": asdict(cfg), "_model": model, "_per_item": per_item}


def retrieval_sets(data: List[str], eval_data: Optional[List[str]], image_root: Optional[str],
                   eval_fraction: float, seed: int, eval_split: str = "test"):
    """(train source, [test sets]): --eval-data files (Karpathy/COCO JSON, jsonl, shards); without
    them, a Karpathy --data's `eval_split`, else a seeded split of --data (its held-out part a test set
    whose repeated images are merged, as every test set's)."""
    train = training_pairs(data, image_root)
    if eval_data:
        return train, test_sets(eval_data, image_root, eval_split)
    if isinstance(train, CaptionPairs) and train.set.split is not None:  # a Karpathy file: its test split
        return train, [load_captioned_test_set(data[0], image_root, eval_split)]
    train_idx, eval_idx = split(len(train), eval_fraction, seed)
    return SubsetSource(train, train_idx), [as_test_set(SubsetSource(train, eval_idx), "held-out")]


# ------------------------------------------------------------------------------------------ command line

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--encoder", required=True, help="megatron_lcl checkpoint or HF CLIPVisionModel folder")
    p.add_argument("--data", required=True, nargs="+",
                   help="synthetic corpus, pairs .jsonl, webdataset shards (several: CC12M CC3M SBU), or a "
                        "Karpathy JSON (dataset_coco.json: its train + restval split)")
    p.add_argument("--eval-data", nargs="+", help="test sets: Karpathy JSON (dataset_coco.json, "
                   "dataset_flickr30k.json), COCO-format captions, pairs .jsonl or shards (default: the Karpathy "
                   "--data's --eval-split, else a split)")
    p.add_argument("--eval-split", default="test", help="the Karpathy split to test on (test, val)")
    p.add_argument("--image-root", help="folder the Karpathy JSON's filepath/filename are relative to "
                   "(default: the JSON's folder)")
    p.add_argument("--eval-fraction", type=float, default=0.2)
    add_config_args(p, RetrievalConfig)  # --epochs --batch-size --lr ... --embed-dim --text-width ... --seed --mode
    common_args(p)
    return parse_with_preset(p, argv, PRESETS)


def load_data(args) -> TaskData:
    train, tests = retrieval_sets(args.data, args.eval_data, args.image_root, args.eval_fraction, args.seed,
                                  args.eval_split)
    held_out_split = not args.eval_data and not isinstance(train, CaptionPairs)  # disjoint by construction
    return TaskData(train, tests, {} if held_out_split else {t.name: t for t in tests})


def summary(result: dict) -> str:
    return (f"{result['num_train']} train pairs / {result['num_eval']} test images, {result['time_s']} s; "
            f"encoder weights unchanged: {result['encoder_unchanged']}")


def run(args, encoder: VisionEncoder, data: TaskData, cfg: RetrievalConfig, layout: ParallelLayout) -> dict:
    return run_retrieval(encoder, data.train, data.tests, cfg, layout, args.checkpoint)


COMMAND = Command(parse_args, RetrievalConfig, ("encoder", "data", "eval_data", "image_root"), load_data, run,
                  summary)


run_command_line, main = entry_points(COMMAND)  # `python -m megatron_lcl.eval.retrieve`, the console script


if __name__ == "__main__":
    sys.exit(main())
