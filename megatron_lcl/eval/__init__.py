"""Transfer evaluation of vision encoders (paper Appendix A.2): classification and retrieval.

    python -m megatron_lcl.eval.classify --encoder CKPT_OR_HF_DIR --data DATA [--mode frozen|full]
    python -m megatron_lcl.eval.retrieve --encoder CKPT_OR_HF_DIR --data PAIRS [--mode frozen|full]

Python API (imported lazily):

    load_encoder(path) -> VisionEncoder            encoders.py: images [n,3,S,S] -> latents [n,M,h]
    linear_probe_accuracy(checkpoint, data) -> top-1 in [0, 1]          classify.py
    run_classification(encoder, train_set, eval_set, ProbeConfig) -> dict
    run_retrieval(encoder, train_set, eval_set, RetrievalConfig) -> dict  retrieve.py
    recall_at_k(similarity, text_to_image) -> {"TR@1": ..., "IR@10": ...}   (percent)

See docs/eval.md.
"""

from megatron_lcl.lazy import lazy_getattr

_EXPORTS = {
    "VisionEncoder": "encoders",
    "load_encoder": "encoders",
    "weights_fingerprint": "encoders",
    "load_labeled": "datasets",
    "load_pairs": "datasets",
    "ProbeConfig": "classify",
    "run_classification": "classify",
    "linear_probe_accuracy": "classify",
    "RetrievalConfig": "retrieve",
    "run_retrieval": "retrieve",
    "recall_at_k": "retrieve",
}

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_getattr(__name__, _EXPORTS)
