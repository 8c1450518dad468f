"""Peak memory and throughput of the classification data path: streaming vs in-memory.

    python tools/bench_eval_data.py --out /tmp/bench_eval --sizes 10000 100000 [--workers 2]

Writes an ImageFolder of N small PNGs (100 classes, 32x32, ~100 B-1 KB each; reused if present), then
for each N, in a fresh process: builds the streaming source (`labeled_source`), reads every image
once through the DataLoader (`LabeledImages`, global batches of 256, `--workers` decoding workers,
eval transform to 32 px) and reports the peak resident memory of the main process and of the
workers (ru_maxrss), the index size and images/s. `--in-memory` also measures holding every image's
bytes in RAM (an `ImageSet`, as a synthetic corpus is held) for comparison.
"""

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import time

CLASSES = 100


def write_folder(root: str, n: int) -> None:
    from PIL import Image

    marker = os.path.join(root, f".complete_{n}")
    if os.path.exists(marker):
        return
    rng = random.Random(0)
    for i in range(n):
        folder = os.path.join(root, f"class_{i % CLASSES:03d}")
        os.makedirs(folder, exist_ok=True)
        img = Image.new("RGB", (32, 32), tuple(rng.randrange(256) for _ in range(3)))
        img.putpixel((rng.randrange(32), rng.randrange(32)), (0, 0, 0))
        img.save(os.path.join(folder, f"{i:07d}.png"))
    open(marker, "w").close()


def measure_stream(root: str, workers: int) -> dict:
    from megatron_lcl.eval.datasets import LabeledImages
    from megatron_lcl.eval.parallel import GlobalBatches, loader
    from megatron_lcl.eval.sources import labeled_source

    t0 = time.time()
    source = labeled_source(root)
    index_s = time.time() - t0
    data = LabeledImages(source, 32)
    seen, t0 = 0, time.time()
    for batch in loader(data, GlobalBatches(len(data), 256, 0, 0, shuffle=True, drop_last=False), workers):
        seen += len(batch["index"])
    read_s = time.time() - t0
    return {"images": seen, "index_bytes": int(source.files.nbytes + source.labels.nbytes), "index_s": round(index_s, 2),
            "images_per_s": round(seen / read_s, 1)}


def measure_memory(root: str) -> dict:
    from megatron_lcl.eval.sources import ImageFolderSource, ImageSet

    t0 = time.time()
    folder = ImageFolderSource(root)
    images = ImageSet([folder.image_bytes(i) for i in range(len(folder))], [folder.origin(i) for i in range(len(folder))],
                      labels=folder.labels, class_names=folder.class_names)
    return {"images": len(images), "bytes_in_ram": sum(len(b) for b in images.images),
            "load_s": round(time.time() - t0, 2)}


def child(args) -> None:
    result = measure_stream(args.root, args.workers) if args.path == "stream" else measure_memory(args.root)
    result["peak_rss_main_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    result["peak_rss_worker_mb"] = round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1)
    print(json.dumps(result))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="/tmp/bench_eval")
    p.add_argument("--sizes", type=int, nargs="+", default=[10000, 100000])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--in-memory", action="store_true")
    p.add_argument("--child", choices=("stream", "memory"), dest="path")
    p.add_argument("--root")
    args = p.parse_args(argv)
    if args.path:
        return child(args)
    rows = []
    for n in args.sizes:
        root = os.path.join(args.out, f"folder_{n}")
        t0 = time.time()
        write_folder(root, n)
        print(f"{n} images at {root} ({time.time() - t0:.0f} s to write)", flush=True)
        for path in ("stream", "memory") if args.in_memory else ("stream",):
            cmd = [sys.executable, __file__, "--child", path, "--root", root, "--workers", str(args.workers)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
            rows.append(dict(json.loads(out), n=n, path=path))
            print(json.dumps(rows[-1]), flush=True)
    with open(os.path.join(args.out, "bench_eval_data.json"), "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
