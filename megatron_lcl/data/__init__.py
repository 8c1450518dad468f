"""Interleaved image-text data for LCL: MMC4 / OBELICS / LAION -> tokenized, packed `LCLBatch`es.

Public API (imported lazily, so `from megatron_lcl.data.batch import LCLBatch` stays cheap):

    LCLTokenizer(model_path)                       tokenizer.py
    train_tokenizer(texts, model_prefix, vocab_size)
    build_loader(data: DataConfig, *, image_size, num_image_tokens, dp_rank, dp_size)  -> LCLDataLoader
    LCLDataLoader: iterate for LCLBatch; state_dict() / load_state_dict(); skip_counts()
    prepare(source, inputs, output_dir, images_dir=None, options=None)       prepare.py
    write_corpus(output, num_docs, image_size, seed, ...)                    synthetic.py
    preprocess_image(data, image_size, rng=None)   train (rng given) or eval transform of image bytes

See docs/data.md for formats, rules and commands.
"""

from megatron_lcl.lazy import lazy_getattr

_EXPORTS = {
    "LCLBatch": "batch",
    "LCLTokenizer": "tokenizer",
    "train_tokenizer": "tokenizer",
    "build_loader": "loader",
    "LCLDataLoader": "loader",
    "prepare": "prepare",
    "PrepareOptions": "prepare",
    "write_corpus": "synthetic",
    "labeled_images": "synthetic",
    "preprocess_image": "transforms",
    "SkipCounter": "skips",
}

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_getattr(__name__, _EXPORTS)
