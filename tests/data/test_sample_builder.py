"""The paper's rules (Appendix A.1), checked on many seeded documents."""

import random

import pytest

from megatron_lcl.data.documents import DocImage, Document
from megatron_lcl.data.sample_builder import (MAX_IMAGES_PER_DOC, ConcatPacker, SpecialIds, choose_mmc4_images,
                                              document_layout, matched_layout, tokenize_layout,
                                              truncate_and_pad)

IDS = SpecialIds(pad=0, bos=2, eos=3, boi=4, eoi=5, image=6)
M = 8


class WordTokenizer:
    """One id (>= 10) per word: lets tests reason about lengths exactly."""

    def encode(self, text):
        return [10 + len(w) for w in text.split()]


def mmc4_doc(num_texts=5, sims=(0.3, 0.3), words=4, key="d"):
    texts = [" ".join(["w"] * words) for _ in range(num_texts)]
    images = [DocImage(data=b"", matched_text_index=j % num_texts, matched_sim=s) for j, s in enumerate(sims)]
    return Document(key, "mmc4", texts, images, origin=f"test:{key}")


def image_spans(sample, seq_length):
    """Check every image's run <BoI> <img>*M <EoI> lies inside the inputs window; return the spans."""
    spans = []
    for p in sample.boi_positions:
        run = sample.tokens[p:p + M + 2]
        assert run == [IDS.boi] + [IDS.image] * M + [IDS.eoi], f"image at {p} is cut: {run}"
        assert p + M + 1 < seq_length
        spans.append((p, p + M + 1))
    assert sample.tokens.count(IDS.boi) == len(sample.boi_positions)  # no orphan <BoI>
    assert sample.tokens.count(IDS.image) == M * len(sample.boi_positions)
    return spans


def test_similarity_threshold_and_max_images():
    rng = random.Random(0)
    doc = mmc4_doc(num_texts=10, sims=[0.5, 0.239, 0.24, 0.1] + [0.3] * 8)
    for _ in range(200):
        chosen = choose_mmc4_images(doc, rng)
        assert len(chosen) == MAX_IMAGES_PER_DOC and chosen == sorted(chosen)
        assert 1 not in chosen and 3 not in chosen  # below 0.24
    few = mmc4_doc(sims=[0.3, 0.2, 0.24])
    assert choose_mmc4_images(few, rng) == [0, 2]  # 0.24 itself is kept


def test_before_after_is_half():
    doc = mmc4_doc(num_texts=3, sims=[0.3])
    before = 0
    trials = 4000
    for seed in range(trials):
        layout = matched_layout(doc, [0], random.Random(seed))
        before += layout.index(("image", 0)) < layout.index(("text", 0))
        assert [x for x in layout if x[0] == "text"] == [("text", 0), ("text", 1), ("text", 2)]
    assert abs(before / trials - 0.5) < 0.03  # 4000 trials: std 0.008


def test_laion_random_before_after_is_half():
    doc = Document("p", "laion", ["a caption"], [DocImage(data=b"", matched_text_index=0)], "t:p")
    first = sum(document_layout(doc, random.Random(s))[0] == ("image", 0) for s in range(4000))
    assert abs(first / 4000 - 0.5) < 0.03


def test_layout_is_deterministic_per_seed():
    doc = mmc4_doc(num_texts=10, sims=[0.3] * 9)
    a = [document_layout(doc, random.Random(f"1-0-{k}")) for k in range(20)]
    b = [document_layout(doc, random.Random(f"1-0-{k}")) for k in range(20)]
    assert a == b and len({tuple(x) for x in a}) > 1


@pytest.mark.parametrize("seq_length", [32, 47, 64, 100])
def test_truncation_never_cuts_image_or_text(seq_length):
    tok = WordTokenizer()
    for seed in range(300):
        rng = random.Random(seed)
        doc = mmc4_doc(num_texts=rng.randint(1, 8), sims=[0.3] * rng.randint(1, 8), words=rng.randint(1, 9))
        segments = list(tokenize_layout(doc, document_layout(doc, rng), tok, IDS, M, crop_seed="s"))
        sample = truncate_and_pad(segments, seq_length, IDS.pad)
        assert len(sample.tokens) == seq_length + 1
        image_spans(sample, seq_length)
        assert len(sample.boi_positions) <= MAX_IMAGES_PER_DOC
        # The kept tokens are exactly a prefix of whole segments, then padding.
        kept = [t for t in sample.tokens if t != IDS.pad]
        assert sample.num_padding == seq_length + 1 - len(kept)
        prefix = []
        for seg in segments:
            if len(prefix) == len(kept):
                break
            prefix += seg.tokens
        assert prefix == kept, "truncation cut inside a segment"


def test_long_first_text_is_the_only_cut():
    doc = mmc4_doc(num_texts=2, sims=[0.3], words=100)
    segments = list(tokenize_layout(doc, [("text", 0), ("image", 0), ("text", 1)], WordTokenizer(), IDS, M, "s"))
    sample = truncate_and_pad(segments, 64, IDS.pad)
    assert sample.tokens[0] == IDS.bos and sample.num_padding == 0 and sample.boi_positions == []


def test_short_document_padded_with_eos():
    doc = mmc4_doc(num_texts=1, sims=[0.3], words=3)
    segments = list(tokenize_layout(doc, [("image", 0), ("text", 0)], WordTokenizer(), IDS, M, "s"))
    sample = truncate_and_pad(segments, 64, IDS.pad)
    assert sample.tokens[:1] == [IDS.bos] and sample.boi_positions == [1]
    assert sample.tokens[1 + M + 2:1 + M + 2 + 4] == [11, 11, 11, IDS.eos]
    assert sample.num_padding == 65 - (1 + M + 2 + 4)


def obelics_doc(key, pattern, words=5):
    """pattern like 'tit': text / image segments in order."""
    texts, images, order = [], [], []
    for c in pattern:
        if c == "t":
            order.append(("text", len(texts)))
            texts.append(" ".join(["w"] * words))
        else:
            order.append(("image", len(images)))
            images.append(DocImage(data=key.encode()))
    return Document(key, "obelics", texts, images, f"test:{key}", order)


def test_obelics_windows_move_cut_image_whole():
    seq_length = 40
    packer = ConcatPacker(seq_length, IDS.pad, M)
    tok = WordTokenizer()
    windows, stream = [], []
    for k in range(60):
        rng = random.Random(k)
        doc = obelics_doc(f"d{k}", "".join(rng.choice("ti") for _ in range(rng.randint(1, 6))) + "i",
                          words=rng.randint(1, 30))
        segments = list(tokenize_layout(doc, doc.order, tok, IDS, M, "s"))
        stream += [t for s in segments for t in s.tokens]
        windows += list(packer.add(segments, doc.origin))
    moved = 0
    for w in windows:
        assert len(w.tokens) == seq_length + 1
        image_spans(w, seq_length)
        moved += w.num_padding > 0
    assert moved > 5, "fixture should force images across window edges"
    # Concatenating windows (dropping padding and the one-token overlap) gives back the token stream.
    rebuilt = list(windows[0].tokens[: seq_length + 1 - windows[0].num_padding])
    for prev, w in zip(windows, windows[1:]):
        body = w.tokens[: seq_length + 1 - w.num_padding]
        rebuilt += body[1:] if prev.num_padding == 0 else body
    assert rebuilt == stream[: len(rebuilt)] and len(stream) - len(rebuilt) < seq_length + 1
    # Padding appears only where an image did not fit: the next window starts with <BoI>.
    for prev, w in zip(windows, windows[1:]):
        if prev.num_padding:
            assert w.tokens[0] == IDS.boi and w.boi_positions[0] == 0
            assert seq_length + 1 - prev.num_padding + M + 2 > seq_length  # it really did not fit


def test_packer_rejects_images_longer_than_window():
    with pytest.raises(AssertionError, match="seq_length"):
        ConcatPacker(9, IDS.pad, 8)


def test_document_packer_keeps_documents_whole():
    from megatron_lcl.data.sample_builder import DocumentPacker

    seq_length = 64
    packer = DocumentPacker(seq_length, IDS.pad, lookahead=8)
    tok = WordTokenizer()
    alone, samples = {}, []
    for k in range(200):
        rng = random.Random(k)
        doc = mmc4_doc(num_texts=rng.randint(1, 4), sims=[0.3] * rng.randint(1, 3), words=rng.randint(1, 8),
                       key=f"d{k}")
        segments = list(tokenize_layout(doc, document_layout(doc, rng), tok, IDS, M, crop_seed="s"))
        single = truncate_and_pad(segments, seq_length, IDS.pad)
        alone[doc.origin] = single.tokens[: seq_length + 1 - single.num_padding]
        samples += list(packer.add(segments, doc.origin))
    emitted = [o for s in samples for o in s.origins]
    assert len(emitted) == len(set(emitted)) and len(emitted) >= 200 - 8  # each document once
    for s in samples:
        assert len(s.tokens) == seq_length + 1
        image_spans(s, seq_length)
        # The sample is its documents, each exactly as truncate_and_pad keeps it, then padding.
        assert s.tokens[: seq_length + 1 - s.num_padding] == [t for o in s.origins for t in alone[o]]
    efficiency = 1 - sum(s.num_padding for s in samples) / sum(len(s.tokens) for s in samples)
    one_per_sample = sum(map(len, alone.values())) / (len(alone) * (seq_length + 1))
    assert efficiency > max(0.75, one_per_sample + 0.2), (efficiency, one_per_sample)


def test_truncation_tokenizes_only_what_fits():
    class CountingTokenizer(WordTokenizer):
        calls = 0

        def encode(self, text):
            self.calls += 1
            return super().encode(text)

    doc = mmc4_doc(num_texts=10_000, sims=[0.3], words=5)  # an enormous document
    tok = CountingTokenizer()
    layout = document_layout(doc, random.Random(0))
    sample = truncate_and_pad(tokenize_layout(doc, layout, tok, IDS, M, "s"), 64, IDS.pad)
    assert sample.num_padding < 6 and tok.calls < 20


# ----------------------------------------------------------------------------- the context rule

def laion_pair(key, image_first, words=3):
    doc = Document(key, "laion", [" ".join(["w"] * words)], [DocImage(data=key.encode(), matched_text_index=0)],
                   f"test:{key}")
    return doc, [("image", 0), ("text", 0)] if image_first else [("text", 0), ("image", 0)]


def test_context_rule_mmc4_image_right_after_bos_has_none():
    """`<s>` alone is no context: the first image (before its sentence) is left out of L_con."""
    doc = mmc4_doc(num_texts=2, sims=[0.3, 0.3])
    layout = [("image", 0), ("text", 0), ("image", 1), ("text", 1)]
    sample = truncate_and_pad(tokenize_layout(doc, layout, WordTokenizer(), IDS, M, "s"), 64, IDS.pad)
    assert sample.boi_positions == [1, 1 + M + 2 + 4] and sample.image_context == [False, True]


def test_context_rule_in_packed_laion_random_windows():
    """Several pairs per window: an image before its caption has only OTHER documents' text before
    it (excluded); an image after its caption is kept."""
    packer, tok = ConcatPacker(40, IDS.pad, M), WordTokenizer()
    windows = []
    for k in range(6):
        doc, layout = laion_pair(f"p{k}", image_first=k % 2 == 1)
        windows += packer.add(tokenize_layout(doc, layout, tok, IDS, M, "s"), doc.origin)
    first = windows[0]  # [<s> w w w img </s>] [<s> img w w w </s>] ...
    assert first.boi_positions[:2] == [4, 4 + M + 2 + 2] and first.image_context[:2] == [True, False]
    for w in windows:  # everywhere: kept iff its caption precedes it in the window (a moved image: none)
        for p, ctx in zip(w.boi_positions, w.image_context):
            assert ctx == (p > 0 and w.tokens[p - 1] != IDS.bos), (p, w.tokens)


def test_context_rule_across_obelics_windows():
    """Text cut at a window edge stays context for its document's next image; an image moved whole to
    the next window starts it at position 0 with no context."""
    tok = WordTokenizer()
    packer = ConcatPacker(40, IDS.pad, M)
    cut = list(packer.add(tokenize_layout(*_obelics("a", "ti", 45), tok, IDS, M, "s"), "a"))
    assert len(cut) == 1  # 1 + 45 words fill the first window; the image follows in the second
    packer_2 = ConcatPacker(40, IDS.pad, M)
    moved = list(packer_2.add(tokenize_layout(*_obelics("b", "titi", 12), tok, IDS, M, "s"), "b"))
    assert moved[0].image_context == [True]  # after 12 words of its own text
    assert packer.current.image_context == [True] and packer.current.boi_positions[0] > 0
    assert packer_2.current.boi_positions == [0] and packer_2.current.image_context == [False]


def _obelics(key, pattern, words):
    doc = obelics_doc(key, pattern, words)
    return doc, doc.order
