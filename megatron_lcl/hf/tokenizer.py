"""Export the sentencepiece tokenizer as a HuggingFace fast tokenizer (`AutoTokenizer`-loadable).

transformers' own `SpmConverter` turns the sentencepiece model (unigram + normalisation) into a
`tokenizers` pipeline; `<BoI>`, `<EoI>`, `<img>` become additional special tokens with our ids.
"""

from types import SimpleNamespace

from tokenizers import decoders
from transformers import PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import SpmConverter

from megatron_lcl.data.tokenizer import BOS, EOS, IMAGE_SYMBOLS, PAD, UNK


class LCLSpmConverter(SpmConverter):
    """transformers' SpmConverter, with byte fallback switched on when the model was trained with it."""

    def __init__(self, original):
        super().__init__(original)
        self.handle_byte_fallback = self.proto.trainer_spec.byte_fallback

    def decoder(self, replacement, add_prefix_space):
        if not self.handle_byte_fallback:
            return super().decoder(replacement, add_prefix_space)
        # as transformers' Llama converter: spaces first, then bytes -> characters
        return decoders.Sequence([decoders.Replace(replacement, " "), decoders.ByteFallback(),
                                  decoders.Fuse(), decoders.Strip(content=" ", left=1, right=0)])


def _converter(sp_model_path: str) -> LCLSpmConverter:
    return LCLSpmConverter(SimpleNamespace(vocab_file=str(sp_model_path), legacy=False, add_prefix_space=True))


def to_hf_tokenizer(sp_model_path: str):
    backend = _converter(sp_model_path).converted()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token=PAD, unk_token=UNK,
                                   bos_token=BOS, eos_token=EOS,
                                   additional_special_tokens=list(IMAGE_SYMBOLS))


def export_tokenizer(sp_model_path: str, out_dir: str):
    """Write `out_dir` (tokenizer.json + config) and return the HF tokenizer."""
    tokenizer = to_hf_tokenizer(sp_model_path)
    tokenizer.save_pretrained(out_dir)
    return tokenizer
