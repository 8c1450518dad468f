"""The paper's sample-building rules (Appendix A.1), from a `Document` to a token sequence.

Sequence layout (M = num_image_tokens): every image is `<BoI>`, M x `<img>`, `<EoI>`; a document is
`<s>` + its text/image segments + `</s>`. A sample holds `seq_length + 1` tokens (inputs are the first
`seq_length`, labels the last `seq_length`); every image lies fully inside the inputs window.

- MMC4: keep images with matched_sim >= 0.24, choose up to 6 at random (document order kept), put
  each before or after its matched sentence with probability 1/2, use all text. A document longer
  than the sample is truncated at a segment boundary (never inside an image or a text segment; only
  a first text segment longer than the whole sample is cut), then padded. One document per sample.
- LAION-Random: the image goes before or after its caption with probability 1/2; pairs are then
  packed like OBELICS.
- OBELICS: documents (1..6 images, filtered by prepare.py) are concatenated and cut into windows;
  text may be cut anywhere (consecutive windows overlap by one token, as in GPT pre-training), an
  image that would be cut moves whole to the next window (the rest of the current one is padded).

Context rule (for L_con): an image has context when text of its OWN document precedes it inside the
sample (`<s>` alone does not count, nor text of an earlier document packed into the same window, nor
text left in the previous window). Each packer records it per image (`BuiltSample.image_context`);
images without context still feed L_gen but are left out of L_con.

All randomness comes from a `random.Random` the caller seeds per document, so a document is built
the same way whichever worker or rank reads it.
"""

import random
from dataclasses import dataclass, field
from typing import Iterable, Iterator, List, Optional, Tuple

from megatron_lcl.config.validate import min_seq_length
from megatron_lcl.data.documents import DocImage, Document

MIN_SIMILARITY = 0.24
MAX_IMAGES_PER_DOC = 6

Layout = List[Tuple[str, int]]  # [("text", i) | ("image", j)] into doc.texts / doc.images


@dataclass
class Segment:
    tokens: List[int]
    image: Optional[DocImage] = None  # set for image segments (<BoI> <img>*M <EoI>)
    crop_seed: str = ""  # seeds the image's random crop
    is_text: bool = False  # the document's own text (not <s>, </s> or an image): context for a later image


@dataclass
class BuiltSample:
    tokens: List[int]  # seq_length + 1 ids
    boi_positions: List[int] = field(default_factory=list)
    images: List[Segment] = field(default_factory=list)  # image segments, parallel to boi_positions
    image_context: List[bool] = field(default_factory=list)  # parallel: own-document text precedes it
    origins: List[str] = field(default_factory=list)  # documents it was built from
    num_padding: int = 0


@dataclass
class SpecialIds:
    pad: int
    bos: int
    eos: int
    boi: int
    eoi: int
    image: int

    @classmethod
    def of(cls, tokenizer) -> "SpecialIds":
        t = tokenizer
        return cls(t.pad_id, t.bos_id, t.eos_id, t.boi_id, t.eoi_id, t.image_id)


# ----------------------------------------------------------------------------- layouts

def choose_mmc4_images(doc: Document, rng: random.Random, max_images: int = MAX_IMAGES_PER_DOC,
                       min_similarity: float = MIN_SIMILARITY) -> List[int]:
    """Indices (in document order) of up to `max_images` images with matched_sim >= threshold."""
    eligible = [j for j, img in enumerate(doc.images)
                if img.matched_sim is None or img.matched_sim >= min_similarity]
    if len(eligible) > max_images:
        eligible = sorted(rng.sample(eligible, max_images))
    return eligible


def matched_layout(doc: Document, chosen: List[int], rng: random.Random) -> Layout:
    """Each chosen image before (p=1/2) or after its matched text segment; all text kept."""
    before = {i: [] for i in range(len(doc.texts))}
    after = {i: [] for i in range(len(doc.texts))}
    for j in chosen:
        side = before if rng.random() < 0.5 else after
        side[doc.images[j].matched_text_index].append(j)
    layout: Layout = []
    for i in range(len(doc.texts)):
        layout += [("image", j) for j in before[i]] + [("text", i)] + [("image", j) for j in after[i]]
    return layout


def document_layout(doc: Document, rng: random.Random) -> Layout:
    if doc.source == "mmc4":
        return matched_layout(doc, choose_mmc4_images(doc, rng), rng)
    if doc.source == "laion":
        return matched_layout(doc, list(range(len(doc.images))), rng)
    if doc.source == "obelics":
        return list(doc.order)
    raise ValueError(f"{doc.origin}: unknown source {doc.source!r}")


def tokenize_layout(doc: Document, layout: Layout, tokenizer, ids: SpecialIds,
                    num_image_tokens: int, crop_seed: str) -> Iterator[Segment]:
    """`<s>` + segments + `</s>`; an image segment is `<BoI>` + M x `<img>` + `<EoI>`.

    A generator: truncation stops pulling segments once the sample is full, so the unused tail
    of a very long document is never tokenized.
    """
    image_tokens = [ids.boi] + [ids.image] * num_image_tokens + [ids.eoi]
    yield Segment([ids.bos])
    for kind, i in layout:
        if kind == "text":
            tokens = tokenizer.encode(doc.texts[i])
            if tokens:
                yield Segment(tokens, is_text=True)
        else:
            yield Segment(image_tokens, doc.images[i], f"{crop_seed}-img{i}")
    yield Segment([ids.eos])


# ----------------------------------------------------------------------------- packing

def truncate_and_pad(segments: Iterable[Segment], seq_length: int, pad_id: int, origin: str = "") -> BuiltSample:
    """MMC4: keep whole segments while they fit in seq_length + 1 tokens, then pad.

    An image fits only if its `<EoI>` lands inside the inputs window (position < seq_length).
    """
    total = seq_length + 1
    sample = BuiltSample(tokens=[], origins=[origin])
    context = False  # own text seen before the current position
    for k, seg in enumerate(segments):
        pos = len(sample.tokens)
        if seg.image is not None:
            if pos + len(seg.tokens) > seq_length:
                break
            sample.boi_positions.append(pos)
            sample.images.append(seg)
            sample.image_context.append(context)
        elif pos + len(seg.tokens) > total:
            if k <= 1:  # a first text segment longer than the whole sample: the only cut allowed
                sample.tokens += seg.tokens[: total - pos]
            break
        context = context or seg.is_text
        sample.tokens += seg.tokens
    sample.num_padding = total - len(sample.tokens)
    sample.tokens += [pad_id] * sample.num_padding
    return sample


class ConcatPacker:
    """OBELICS/LAION: concatenate documents and cut `seq_length + 1`-token windows.

    `add(segments, origin)` yields every window it completes. Text is cut anywhere (the next window
    starts with the previous window's last token, which was only a label there); an image that does
    not fit in the current inputs window closes it (padded) and starts the next one whole.
    """

    def __init__(self, seq_length: int, pad_id: int, num_image_tokens: int):
        assert seq_length >= min_seq_length(num_image_tokens), (  # validated with the config
            f"seq_length ({seq_length}) is shorter than one image needs ({min_seq_length(num_image_tokens)})")
        self.seq_length, self.pad_id = seq_length, pad_id
        self.current = BuiltSample(tokens=[])
        self.context = False  # the current window holds text of the current document

    def add(self, segments: Iterable[Segment], origin: str) -> Iterator[BuiltSample]:
        total = self.seq_length + 1
        self.current.origins.append(origin)
        self.context = False  # a new document: earlier text in the window is not its context
        for seg in segments:
            if seg.image is not None:
                if len(self.current.tokens) + len(seg.tokens) > self.seq_length:
                    yield self._close(carry=False, origin=origin)
                self.current.boi_positions.append(len(self.current.tokens))
                self.current.images.append(seg)
                self.current.image_context.append(self.context)
                self.current.tokens += seg.tokens
                continue
            tokens = seg.tokens
            while tokens:
                room = total - len(self.current.tokens)
                self.current.tokens += tokens[:room]
                self.context = self.context or seg.is_text
                tokens = tokens[room:]
                if len(self.current.tokens) == total:
                    yield self._close(carry=True, origin=origin)
                    self.context = seg.is_text  # the carried token is this segment's last one

    def _close(self, carry: bool, origin: str) -> BuiltSample:
        done = self.current
        done.num_padding = self.seq_length + 1 - len(done.tokens)
        done.tokens += [self.pad_id] * done.num_padding
        self.current = BuiltSample(tokens=[done.tokens[-1]] if carry else [], origins=[origin])
        self.context = False
        return done


class DocumentPacker:
    """MMC4 with several whole documents per sample (`packing="pack"`, an option beyond the paper).

    Each document is first truncated exactly as `truncate_and_pad` does (so no image or text
    segment is ever cut); documents then wait in a buffer of `lookahead` and each sample is filled
    with the oldest waiting document followed by best-fit choices (largest that fits whole, all its
    images inside the inputs window). The oldest-first start bounds how long a document waits.
    """

    def __init__(self, seq_length: int, pad_id: int, lookahead: int = 32):
        self.seq_length, self.pad_id, self.lookahead = seq_length, pad_id, lookahead
        self.pending: List[BuiltSample] = []

    def add(self, segments: Iterable[Segment], origin: str) -> Iterator[BuiltSample]:
        doc = truncate_and_pad(segments, self.seq_length, self.pad_id, origin)
        doc.tokens = doc.tokens[: self.seq_length + 1 - doc.num_padding]  # unpadded
        self.pending.append(doc)
        if len(self.pending) >= self.lookahead:
            yield self._fill()

    def _fits(self, sample: BuiltSample, doc: BuiltSample) -> bool:
        offset = len(sample.tokens)
        last_eoi = max((p + len(seg.tokens) - 1 for p, seg in zip(doc.boi_positions, doc.images)), default=-1)
        return offset + len(doc.tokens) <= self.seq_length + 1 and offset + last_eoi < self.seq_length

    def _fill(self) -> BuiltSample:
        sample = BuiltSample(tokens=[])
        doc = self.pending.pop(0)
        while doc is not None:
            offset = len(sample.tokens)
            sample.tokens += doc.tokens
            sample.boi_positions += [offset + p for p in doc.boi_positions]
            sample.images += doc.images
            sample.image_context += doc.image_context
            sample.origins += doc.origins
            fitting = [k for k, d in enumerate(self.pending) if self._fits(sample, d)]
            best = max(fitting, key=lambda k: len(self.pending[k].tokens), default=None)
            doc = None if best is None else self.pending.pop(best)
        sample.num_padding = self.seq_length + 1 - len(sample.tokens)
        sample.tokens += [self.pad_id] * sample.num_padding
        return sample
