"""Transfer evaluation of vision encoders (paper Appendix A.2): classification, retrieval, captioning.

    python -m megatron_lcl.eval.classify --encoder CKPT_OR_HF_DIR --data DATA [--mode frozen|full]
    python -m megatron_lcl.eval.retrieve --encoder CKPT_OR_HF_DIR --data PAIRS [--mode frozen|full]
    python -m megatron_lcl.eval.caption --encoder CKPT_OR_HF_DIR --lm HF_LM --data PAIRS --eval-data KARPATHY_JSON
    (all three run data-parallel under torchrun; --preset paper: Table 8)

Python API (imported lazily):

    load_encoder(path) -> VisionEncoder            encoders.py: images [n,3,S,S] -> latents [n,M,h]
    labeled_source(path) / pair_source(paths)      sources.py: the data, by what a path is
    linear_probe_accuracy(checkpoint, data) -> top-1 in [0, 1]          classify.py
    run_classification(encoder, train, eval, ProbeConfig) -> dict
    run_retrieval(encoder, train, [test sets], RetrievalConfig) -> dict  retrieve.py
    recall_at_k(similarity, text_to_image) -> {"TR@1": ..., "IR@10": ...}   (percent)
    run_captioning(encoder, lm, train, [test sets], CaptionConfig) -> dict   caption.py
    load_karpathy(json) -> CaptionedTestSet; caption_scores(refs, hyps) -> CIDEr, BLEU-4

Every task trains through one engine (engine.fit) over one kind of data source; see docs/eval.md.
"""

from megatron_lcl.lazy import lazy_getattr

_EXPORTS = {
    "VisionEncoder": "encoders",
    "load_encoder": "encoders",
    "weights_fingerprint": "encoders",
    "ImageSet": "sources",
    "labeled_source": "sources",
    "pair_source": "sources",
    "ProbeConfig": "classify",
    "run_classification": "classify",
    "linear_probe_accuracy": "classify",
    "RetrievalConfig": "retrieve",
    "run_retrieval": "retrieve",
    "recall_at_k": "retrieve",
    "CaptionConfig": "caption",
    "run_captioning": "caption",
    "caption_scores": "caption_metrics",
    "load_karpathy": "karpathy",
}

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_getattr(__name__, _EXPORTS)
