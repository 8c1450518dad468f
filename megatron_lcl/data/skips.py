"""Counting what was skipped, by reason, naming where it came from.

Nothing is dropped silently: every reader, `prepare_data` and the loader record each skipped
document/image/sample here with a reason and a location ("shard-00003.tar:doc_000042").
"""

from collections import Counter
from typing import Dict, List

# Reasons used across the pipeline (free-form strings are allowed, these are the usual ones).
CORRUPT_IMAGE = "corrupt_image"
MISSING_IMAGE = "missing_image"
MALFORMED_JSON = "malformed_json"
NO_USABLE_IMAGE = "no_usable_image"
LOW_SIMILARITY = "low_similarity_image"
TOO_LARGE = "too_large_document"
TOO_MANY_IMAGES = "too_many_images"
CORRUPT_SHARD = "corrupt_shard"
BAD_SAMPLE = "bad_sample"


class SkipCounter:
    """Counts skips by reason and keeps the first `max_examples` locations of each reason."""

    def __init__(self, max_examples: int = 20):
        self.max_examples = max_examples
        self.counts: Counter = Counter()
        self.examples: Dict[str, List[str]] = {}

    def add(self, reason: str, where: str, detail: str = "", count: int = 1) -> None:
        self.counts[reason] += count
        examples = self.examples.setdefault(reason, [])
        if len(examples) < self.max_examples:
            examples.append(f"{where}: {detail}" if detail else where)

    def merge(self, other: "SkipCounter") -> None:
        for reason, n in other.counts.items():
            self.counts[reason] += n
            room = self.max_examples - len(self.examples.setdefault(reason, []))
            self.examples[reason].extend(other.examples.get(reason, [])[: max(room, 0)])

    def total(self) -> int:
        return sum(self.counts.values())

    def __bool__(self) -> bool:
        return bool(self.counts)

    def state_dict(self) -> dict:
        return {"counts": dict(self.counts), "examples": {k: list(v) for k, v in self.examples.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.counts = Counter(state["counts"])
        self.examples = {k: list(v) for k, v in state["examples"].items()}

    def summary(self) -> str:
        if not self.counts:
            return "  (nothing skipped)"
        lines = []
        for reason, n in sorted(self.counts.items()):
            lines.append(f"  {reason}: {n}")
            lines.extend(f"      e.g. {e}" for e in self.examples.get(reason, [])[:3])
        return "\n".join(lines)
