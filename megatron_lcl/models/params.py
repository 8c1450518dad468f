"""Parameter counts by group (ViT, projector, LM, heads)."""

from collections import OrderedDict

GROUPS = OrderedDict([
    ("vit", ("vision.",)),
    ("projector", ("projector.",)),
    ("lm", ("lm.",)),
    ("heads", ("image_head.", "text_head.")),
])


def count_parameters_by_group(model) -> "OrderedDict[str, int]":
    """{group: number of parameters} on this rank, plus 'total'. The tied output layer counts once."""
    counts = OrderedDict((g, 0) for g in GROUPS)
    seen = set()
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        name = name.removeprefix("module.")
        group = next((g for g, prefixes in GROUPS.items() if name.startswith(prefixes)), None)
        assert group is not None, f"parameter {name} belongs to no group"
        counts[group] += p.numel()
    counts["total"] = sum(counts.values())
    return counts
