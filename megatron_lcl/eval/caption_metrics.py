"""Captioning scores with the COCO caption evaluation code (`pycocoevalcap`): CIDEr(-D) and BLEU-4.

The official pipeline tokenizes with the Stanford PTB tokenizer (a Java program shipped inside
pycocoevalcap). Where `java` is not on PATH (or `tokenizer="python"`), captions are tokenized in
Python instead: lower-cased, split into words, clitics ('s) and punctuation, then the PTB
tokenizer's punctuation list is removed, as pycocoevalcap does. The result names which tokenizer
ran, so numbers from the two are never mixed up silently (they agree on plain captions; they can
differ on hyphenation and unusual punctuation).

    caption_scores({img: [ref, ...]}, {img: hypothesis}) -> {"CIDEr": ..., "BLEU-4": ..., "tokenizer": ...}

Scores are reported x100 (as papers print them: CIDEr 117.3, B@4 36.5).
"""

import re
import shutil
from typing import Dict, List

# pycocoevalcap/tokenizer/ptbtokenizer.py: tokens dropped after tokenization
PUNCTUATIONS = {"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--",
                "...", ";"}
_TOKEN = re.compile(r"'[a-z]+|[a-z0-9]+|\.\.\.|--|[^\sa-z0-9]")


def python_tokenize(text: str) -> str:
    """A Python stand-in for the PTB tokenizer + pycocoevalcap's punctuation removal."""
    return " ".join(t for t in _TOKEN.findall(text.lower()) if t not in PUNCTUATIONS)


def java_available() -> bool:
    return shutil.which("java") is not None


def tokenize(captions: Dict[object, List[str]], tokenizer: str = "auto"):
    """-> ({key: [tokenized caption, ...]}, the tokenizer's name). tokenizer: auto | ptb | python."""
    if tokenizer == "ptb" or (tokenizer == "auto" and java_available()):
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        keyed = {k: [{"caption": c} for c in caps] for k, caps in captions.items()}
        return PTBTokenizer().tokenize(keyed), "ptb (Stanford CoreNLP, Java)"
    reason = "requested" if tokenizer == "python" else "Java not found on PATH"
    return {k: [python_tokenize(c) for c in caps] for k, caps in captions.items()}, f"python ({reason})"


def caption_scores(references: Dict[object, List[str]], hypotheses: Dict[object, str],
                   tokenizer: str = "auto") -> dict:
    """CIDEr-D and BLEU-1..4 (x100) of one hypothesis per image against its references."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    missing = set(references) ^ set(hypotheses)
    assert not missing, f"references and hypotheses cover different images, e.g. {sorted(map(str, missing))[:5]}"
    empty = [k for k, refs in references.items() if not refs]
    assert not empty, f"images without reference captions: {empty[:5]}"
    refs, name = tokenize(references, tokenizer)
    hyps, _ = tokenize({k: [h] for k, h in hypotheses.items()}, tokenizer)
    cider, _ = Cider().compute_score(refs, hyps)
    bleu, _ = Bleu(4).compute_score(refs, hyps, verbose=0)
    return {"CIDEr": 100.0 * float(cider), "BLEU-4": 100.0 * float(bleu[3]),
            "BLEU-1": 100.0 * float(bleu[0]), "num_images": len(references), "tokenizer": name}
