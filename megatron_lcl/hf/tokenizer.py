"""Export the sentencepiece tokenizer as a HuggingFace fast tokenizer (`AutoTokenizer`-loadable).

transformers' own `SpmConverter` turns the sentencepiece model (unigram + normalisation) into a
`tokenizers` pipeline; `<BoI>`, `<EoI>`, `<img>` become additional special tokens with our ids.
"""

from types import SimpleNamespace

from megatron_lcl.data.tokenizer import BOS, EOS, IMAGE_SYMBOLS, PAD, UNK


def to_hf_tokenizer(sp_model_path: str):
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import SpmConverter

    backend = SpmConverter(SimpleNamespace(vocab_file=str(sp_model_path), legacy=False,
                                           add_prefix_space=True)).converted()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token=PAD, unk_token=UNK,
                                   bos_token=BOS, eos_token=EOS,
                                   additional_special_tokens=list(IMAGE_SYMBOLS))


def export_tokenizer(sp_model_path: str, out_dir: str):
    """Write `out_dir` (tokenizer.json + config) and return the HF tokenizer."""
    tokenizer = to_hf_tokenizer(sp_model_path)
    tokenizer.save_pretrained(out_dir)
    return tokenizer
