"""Convert MMC4 / OBELICS / LAION into the webdataset shards the LCL loader streams.

    python tools/prepare_data.py --format mmc4 --input mmc4/docs/ --images-dir mmc4/images --output data/mmc4
    python tools/prepare_data.py --format obelics --input 'obelics/*.parquet' --output data/obelics
    python tools/prepare_data.py --format laion --input 'laion/{00000..00099}.tar' --output data/laion
    python tools/prepare_data.py --format mmc4_pair --input mmc4/docs/ --images-dir mmc4/images --output data/mmc4_pair

Writes DIR/shard-000000.tar ... (one sample per document) and DIR/summary.json, and prints a
summary: documents and images in/out, drops by reason with examples (file:line or shard:key).
See docs/data.md for the formats and the rules applied here.
"""

import argparse


from megatron_lcl.data.prepare import INPUT_PATTERNS, PrepareOptions, prepare


def main(argv=None) -> None:
    defaults = PrepareOptions()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--format", required=True, choices=sorted(INPUT_PATTERNS))
    p.add_argument("--input", required=True, nargs="+", help="files, folders or globs")
    p.add_argument("--output", required=True, help="output folder for shard-*.tar")
    p.add_argument("--images-dir", default=None,
                   help="MMC4 / MMC4-Pair: folder of image files named by image_name (default: INPUT/images or INPUT); "
                        "OBELICS: base for relative image paths (default: the row file's folder)")
    p.add_argument("--shard-size", type=int, default=defaults.shard_size, help="documents per output shard")
    p.add_argument("--min-similarity", type=float, default=defaults.min_similarity, help="MMC4 matched_sim threshold")
    p.add_argument("--max-image-side", type=int, default=defaults.max_image_side,
                   help="downscale larger images to this side (keeps loading fast)")
    p.add_argument("--max-doc-chars", type=int, default=defaults.max_doc_chars)
    p.add_argument("--max-doc-images", type=int, default=defaults.max_doc_images)
    p.add_argument("--num-workers", type=int, default=1,
                   help="processes, each preparing every N-th input file into its own shards")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    options = PrepareOptions(args.min_similarity, args.max_image_side, args.max_doc_chars,
                             args.max_doc_images, args.shard_size)
    summary = prepare(args.format, args.input, args.output, args.images_dir, options,
                      progress=not args.no_progress, num_workers=args.num_workers)
    print(f"prepared {args.format} -> {args.output}\n{summary.report()}")


if __name__ == "__main__":
    main()
