"""Data pipeline throughput and packing efficiency on MMC4-like synthetic documents.

    python tools/bench_data.py                       # seq 2048, 224 px, M = 197 (ViT-B/16), 1 worker
    python tools/bench_data.py --num-workers 2 --packing pack

Writes a synthetic MMC4 corpus (images drawn at --source-image-size, like web images after
prepare_data's 512 px cap), trains a tokenizer, prepares shards, then times the loader:
images/s and tokens/s per worker (one worker = one process = one core) and packing efficiency
(the fraction of sequence positions that are not padding).
"""

import argparse
import os
import tempfile
import time

import torch

from megatron_lcl.config import DataConfig
from megatron_lcl.data.loader import build_loader
from megatron_lcl.data.prepare import prepare
from megatron_lcl.data.skips import SkipCounter
from megatron_lcl.data.sources import read_mmc4
from megatron_lcl.data.synthetic import write_corpus
from megatron_lcl.data.tokenizer import LCLTokenizer, train_tokenizer


def build_inputs(work: str, args) -> tuple:
    corpus, prepared = os.path.join(work, "corpus"), os.path.join(work, "prepared")
    t0 = time.time()
    paths = write_corpus(corpus, args.num_docs, args.source_image_size, seed=0, docs_per_shard=100,
                         max_images=args.max_images, filler=args.filler)
    texts = [t for p in paths for d in read_mmc4(p, os.path.join(corpus, "images"), SkipCounter()) for t in d.texts]
    tokenizer = train_tokenizer(texts, os.path.join(work, "tok"), args.vocab_size)
    summary = prepare("mmc4", [corpus], prepared, progress=False)
    print(f"corpus: {summary.docs_out} documents, {summary.images_out} images "
          f"({args.source_image_size} px) prepared in {time.time() - t0:.1f} s")
    return prepared, tokenizer


def measure(prepared: str, tokenizer: str, args) -> dict:
    # A DataLoader worker runs torch with one thread; measure the in-process case the same way.
    torch.set_num_threads(1)
    data = DataConfig(path=[prepared], tokenizer=tokenizer, seq_length=args.seq_length,
                      micro_batch_size=args.micro_batch_size, seed=0, num_workers=args.num_workers,
                      packing=args.packing)
    loader = build_loader(data, image_size=args.image_size, num_image_tokens=args.num_image_tokens)
    pad_id = LCLTokenizer(tokenizer).pad_id
    images = tokens = real = text_targets = 0
    it = iter(loader)
    for _ in range(args.warmup_batches):
        next(it)
    t0 = time.time()
    for _ in range(args.batches):
        batch = next(it)
        images += batch.num_images
        tokens += batch.tokens.numel()
        real += int((batch.tokens != pad_id).sum())
        text_targets += int(batch.loss_mask.sum())
    elapsed = time.time() - t0
    workers = max(args.num_workers, 1)
    return {
        "images_per_s_per_worker": images / elapsed / workers,
        "tokens_per_s_per_worker": tokens / elapsed / workers,
        "images_per_sample": images / (args.batches * args.micro_batch_size),
        "packing_efficiency": real / tokens,
        "text_target_fraction": text_targets / tokens,
        "elapsed_s": elapsed,
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seq-length", type=int, default=2048)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--num-image-tokens", type=int, default=197,
                   help="M = patches + class token: 197 for ViT-B/16 at 224 px, 257 for ViT-L/14")
    p.add_argument("--source-image-size", type=int, default=448)
    p.add_argument("--num-docs", type=int, default=400)
    p.add_argument("--max-images", type=int, default=8, help="images per synthetic document: 1..N")
    p.add_argument("--filler", type=int, default=30, help="up to N filler sentences before/after captions")
    p.add_argument("--vocab-size", type=int, default=1000)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--num-workers", type=int, default=0, help="0: measure in this process (one core)")
    p.add_argument("--packing", default="auto", choices=["auto", "truncate", "concat", "pack"])
    p.add_argument("--batches", type=int, default=40)
    p.add_argument("--warmup-batches", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3, help="timed runs (a shared machine is noisy)")
    p.add_argument("--work-dir", default=None, help="reuse/keep inputs here (default: a temp dir)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work_dir or tmp
        if args.work_dir and os.path.exists(os.path.join(work, "tok.model")):
            prepared, tokenizer = os.path.join(work, "prepared"), os.path.join(work, "tok.model")
        else:
            prepared, tokenizer = build_inputs(work, args)
        runs = [measure(prepared, tokenizer, args) for _ in range(args.repeats)]
    print(f"seq_length {args.seq_length}, image {args.image_size} px, M {args.num_image_tokens}, "
          f"packing {args.packing}, workers {args.num_workers or '0 (in process)'}, "
          f"{args.batches} batches of {args.micro_batch_size}; median [min, max] of {args.repeats} runs")
    for k in runs[0]:
        values = sorted(r[k] for r in runs)
        print(f"  {k:26s} {values[len(values) // 2]:11.3f}  [{values[0]:.3f}, {values[-1]:.3f}]")


if __name__ == "__main__":
    main()
