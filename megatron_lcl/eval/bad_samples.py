"""Bad input that never crashes a run: an item that cannot be used is a `BadSample(origin, reason)`;
a `BadSampleLog` counts them by origin and by kind of reason and names the first MAX_NAMED_PROBLEMS
(what the results JSON's `bad_samples` holds and the commands print at the end)."""

import re
from dataclasses import dataclass, field
from typing import Dict, List, Sequence

MAX_NAMED_PROBLEMS = 50  # named in results; beyond that only counted


@dataclass
class BadSample:
    """An item that could not be used: `origin` is the file or `shard:key`, `reason` what failed."""

    origin: str
    reason: str


def reason_kind(reason: str) -> str:
    """What went wrong, without the details: "cannot decode image (UnidentifiedImageError: ...)" ->
    "cannot decode image" (every reason starts with its kind, then ":" or "(" and the details)."""
    return re.split(r"[:(;]", reason, maxsplit=1)[0].strip()


@dataclass
class BadSampleLog:
    """Bad samples by origin: `count` distinct ones (the first MAX_NAMED_PROBLEMS also `named`),
    `reads` failed reads (a bad image in the training set fails once per epoch), and `by_reason`
    the distinct ones per `reason_kind`."""

    count: int = 0
    reads: int = 0
    named: List[str] = field(default_factory=list)
    by_reason: Dict[str, int] = field(default_factory=dict)
    _seen: set = field(default_factory=set, repr=False)

    def add(self, origin: str, reason: str) -> None:
        self.reads += 1
        if origin in self._seen:
            return
        self._seen.add(origin)
        self.count += 1
        kind = reason_kind(reason)
        self.by_reason[kind] = self.by_reason.get(kind, 0) + 1
        if len(self.named) < MAX_NAMED_PROBLEMS:
            self.named.append(f"{origin}: {reason}")

    def extend(self, bad: Sequence[BadSample]) -> None:
        for b in bad:
            self.add(b.origin, b.reason)

    def as_dict(self) -> dict:
        return {"count": self.count, "reads": self.reads, "named": list(self.named),
                "by_reason": dict(self.by_reason)}

    def load(self, saved: dict) -> None:
        self.count, self.reads, self.named = saved["count"], saved["reads"], list(saved["named"])
        self.by_reason = dict(saved.get("by_reason", {}))
        self._seen = {n.split(": ", 1)[0] for n in self.named}


def merge_saved_logs(saved_logs: Sequence[dict]) -> dict:
    """One log (as a dict) from the `as_dict()`s of several ranks' logs (each read different samples)."""
    merged = BadSampleLog()
    for saved in saved_logs:
        named_kinds: dict = {}
        for entry in saved["named"]:
            origin, _, reason = entry.partition(": ")
            merged.add(origin, reason)
            named_kinds[reason_kind(reason)] = named_kinds.get(reason_kind(reason), 0) + 1
        merged.count += saved["count"] - len(saved["named"])  # counted but not named
        merged.reads += saved["reads"] - len(saved["named"])
        for kind, n in saved["by_reason"].items():
            merged.by_reason[kind] = merged.by_reason.get(kind, 0) + n - named_kinds.get(kind, 0)
    return merged.as_dict()


def problems_summary(problems: BadSampleLog, examples: int = 2) -> str:
    """'3 left out (missing file 2, no captions 1), e.g. X: missing file; Y: no captions' (one line)."""
    if not problems.count:
        return "nothing was left out"
    kinds = ", ".join(f"{k} {n}" for k, n in sorted(problems.by_reason.items(), key=lambda kv: (-kv[1], kv[0])))
    return f"{problems.count} left out ({kinds}), e.g. {'; '.join(problems.named[:examples])}"
