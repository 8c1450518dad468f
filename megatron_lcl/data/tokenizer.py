"""sentencepiece tokenizer with the special tokens LCL sequences need.

Ids are fixed by `train_tokenizer` so every model trained with it agrees:

    0 <pad>   1 <unk>   2 <s> (bos)   3 </s> (eos)   4 <BoI>   5 <EoI>   6 <img>

`<BoI>`, `<EoI>` and `<img>` are sentencepiece *control* symbols: they own an id but raw text can
never produce them (a document containing the string "<img>" encodes as ordinary characters), so
web text cannot inject image positions into a sequence.
"""

import io
from typing import Iterable, List, Optional

import sentencepiece as spm

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<s>", "</s>"
BOI, EOI, IMAGE = "<BoI>", "<EoI>", "<img>"
IMAGE_SYMBOLS = (BOI, EOI, IMAGE)


class LCLTokenizer:
    """Thin wrapper over a sentencepiece model trained by `train_tokenizer`."""

    def __init__(self, model_path: str):
        self.model_path = str(model_path)
        self.sp = spm.SentencePieceProcessor(model_file=self.model_path)
        self.vocab_size = self.sp.get_piece_size()
        self.pad_id = self.sp.pad_id()
        self.bos_id = self.sp.bos_id()
        self.eos_id = self.sp.eos_id()
        self.boi_id = self.sp.piece_to_id(BOI)
        self.eoi_id = self.sp.piece_to_id(EOI)
        self.image_id = self.sp.piece_to_id(IMAGE)
        special = [self.pad_id, self.bos_id, self.eos_id, self.boi_id, self.eoi_id, self.image_id]
        unk = self.sp.unk_id()
        assert min(special) >= 0 and unk not in special[3:], (
            f"{model_path} lacks the LCL special tokens {PAD, BOS, EOS, *IMAGE_SYMBOLS}; "
            "train it with megatron_lcl.data.tokenizer.train_tokenizer (tools/train_tokenizer.py)"
        )
        self._special_names = {self.boi_id: BOI, self.eoi_id: EOI, self.image_id: IMAGE}

    def encode(self, text: str) -> List[int]:
        return self.sp.encode(text, out_type=int)

    def decode(self, ids: Iterable[int]) -> str:
        """Decode ids; image tokens are rendered as `<BoI>`, `<img>`, `<EoI>` and padding dropped."""
        pieces, run = [], []
        for i in (int(i) for i in ids):
            if i == self.pad_id:
                continue
            if i in self._special_names:
                if run:
                    pieces.append(self.sp.decode(run))
                    run = []
                pieces.append(self._special_names[i])
            else:
                run.append(i)
        if run:
            pieces.append(self.sp.decode(run))
        return " ".join(p for p in pieces if p)


def train_tokenizer(
    texts: Iterable[str],
    model_prefix: str,
    vocab_size: int,
    model_type: str = "unigram",
    max_sentences: int = 5_000_000,
    character_coverage: Optional[float] = None,
    byte_fallback: bool = False,
) -> str:
    """Train a sentencepiece model on `texts`; writes `{model_prefix}.model`/`.vocab`, returns the .model path.

    Small vocabularies (a few hundred pieces, for tests and the demo) work: the vocab size is a soft
    limit (`hard_vocab_limit=False`). Character coverage defaults to 0.9995 from 1024 pieces up and
    to 1.0 below (every character of a small corpus gets a piece). `byte_fallback=True` turns
    rare characters into UTF-8 byte pieces (any text round-trips; needs >= 256 + characters pieces),
    but megatron_lcl.hf's tokenizer export maps those to <unk>, so it is off by default.
    """
    character_coverage = (0.9995 if vocab_size >= 1024 else 1.0) if character_coverage is None else character_coverage
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=(t for t in texts if t and t.strip()),
        model_writer=model,
        vocab_size=vocab_size,
        model_type=model_type,
        hard_vocab_limit=False,
        character_coverage=character_coverage,
        byte_fallback=byte_fallback,  # rare characters become UTF-8 byte pieces instead of <unk>
        input_sentence_size=max_sentences,
        shuffle_input_sentence=True,
        max_sentence_length=16384,
        pad_id=0,
        unk_id=1,
        bos_id=2,
        eos_id=3,
        pad_piece=PAD,
        unk_piece=UNK,
        bos_piece=BOS,
        eos_piece=EOS,
        control_symbols=list(IMAGE_SYMBOLS),
        minloglevel=2,
    )
    path = f"{model_prefix}.model"
    with open(path, "wb") as f:
        f.write(model.getvalue())
    # Also write the human-readable vocab beside it, like spm_train does.
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    with open(f"{model_prefix}.vocab", "w", encoding="utf-8") as f:
        for i in range(sp.get_piece_size()):
            f.write(f"{sp.id_to_piece(i)}\t{sp.get_score(i)}\n")
    return path
