"""Train the LCL sentencepiece tokenizer on the text of any supported source.

    lcl-train-tokenizer --format mmc4 --input DIR_OR_FILES --output PREFIX --vocab-size 32000
    (or python tools/train_tokenizer.py ..., python -m megatron_lcl.data.build_tokenizer ...)

writes PREFIX.model and PREFIX.vocab (ids: 0 <pad>, 1 <unk>, 2 <s>, 3 </s>, 4 <BoI>, 5 <EoI>, 6 <img>).
--format text reads plain text files, one sentence per line.
"""

import argparse
import os

from tqdm import tqdm

from megatron_lcl.data.prepare import INPUT_PATTERNS, list_inputs
from megatron_lcl.data.skips import SkipCounter
from megatron_lcl.data.sources import read_source
from megatron_lcl.data.tokenizer import LCLTokenizer, train_tokenizer


def iter_texts(fmt: str, inputs, skips: SkipCounter, max_docs: int):
    if fmt == "text":
        for path in inputs:
            with open(path, encoding="utf-8", errors="replace") as f:
                yield from (line.rstrip("\n") for line in f)
        return
    docs = 0
    for path in list_inputs(fmt, inputs):
        for doc in read_source(fmt, path, None, skips):
            yield from doc.texts
            docs += 1
            if docs >= max_docs:
                return


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--format", required=True, choices=sorted(INPUT_PATTERNS) + ["text"])
    p.add_argument("--input", required=True, nargs="+", help="files, folders or globs")
    p.add_argument("--output", required=True, help="model prefix: writes PREFIX.model, PREFIX.vocab")
    p.add_argument("--vocab-size", type=int, default=32000)
    p.add_argument("--model-type", default="unigram", choices=["unigram", "bpe"])
    p.add_argument("--character-coverage", type=float, default=None,
                   help="default: 0.9995 from 1024 pieces up, else 1.0")
    p.add_argument("--byte-fallback", action="store_true",
                   help="rare characters as UTF-8 byte pieces (the HF export does not support it yet)")
    p.add_argument("--max-docs", type=int, default=1_000_000, help="read at most this many documents")
    args = p.parse_args(argv)
    # a mistyped --input: one line and status 2, before anything is written
    if args.format == "text":
        missing = [path for path in args.input if not os.path.isfile(path)]
        if missing:
            p.error(f"--input {missing[0]!r}: no such file")
    else:
        try:
            list_inputs(args.format, args.input)
        except FileNotFoundError as e:
            p.error(str(e))
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    skips = SkipCounter()
    texts = tqdm(iter_texts(args.format, args.input, skips, args.max_docs), desc="texts", unit=" segments")
    path = train_tokenizer(texts, args.output, args.vocab_size, model_type=args.model_type,
                           character_coverage=args.character_coverage,
                           byte_fallback=args.byte_fallback)
    tok = LCLTokenizer(path)
    print(f"wrote {path}: vocab_size {tok.vocab_size} (pad {tok.pad_id}, bos {tok.bos_id}, eos {tok.eos_id}, "
          f"<BoI> {tok.boi_id}, <EoI> {tok.eoi_id}, <img> {tok.image_id})")
    if skips:
        print(f"skipped while reading:\n{skips.summary()}")


if __name__ == "__main__":
    main()
