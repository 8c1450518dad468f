"""What the evaluation commands write: the Table-1-style results table (`results_table`, one for the
three tasks), the bad samples counted by reason, the predictions file beside the metrics JSON, and the
JSON itself."""

import json
import os
import re
from typing import List, Optional, Sequence, Tuple

KS = (1, 5, 10)  # retrieval recall@k
RECALL_NAMES = [f"{d}@{k}" for d in ("TR", "IR") for k in KS]


def format_table(label_columns: Sequence[str], groups: Sequence[Tuple[str, Sequence[str]]],
                 rows: Sequence[Sequence]) -> str:
    """A plain-text table laid out like the paper's Table 1: a row of group titles over the metric
    names, then one row per model. Each row: the label cells, then one number per metric column."""
    metric_names = [name for _, names in groups for name in names]
    cells = [[str(c) for c in row[:len(label_columns)]] +
             [("-" if v is None else f"{v:.1f}") for v in row[len(label_columns):]] for row in rows]
    header = list(label_columns) + metric_names
    widths = [max(len(header[i]), *(len(r[i]) for r in cells)) for i in range(len(header))]
    col = len(label_columns)
    for title, names in groups:  # widen a group's last column until its title fits above it
        span = sum(widths[col:col + len(names)]) + 2 * (len(names) - 1)
        widths[col + len(names) - 1] += max(0, len(title) - span)
        col += len(names)
    label_width = sum(widths[:len(label_columns)]) + 2 * len(label_columns)
    top = " " * label_width
    col = len(label_columns)
    for title, names in groups:
        span = sum(widths[col:col + len(names)]) + 2 * (len(names) - 1)
        top += title[:span].center(span) + "  "
        col += len(names)

    def line(values):
        return "  ".join(v.ljust(widths[i]) if i < len(label_columns) else v.rjust(widths[i])
                         for i, v in enumerate(values))

    rule = "-" * (sum(widths) + 2 * (len(widths) - 1))
    return "\n".join([top.rstrip(), line(header), rule] + [line(r) for r in cells])


def _rows(result: dict) -> List[list]:
    """One table row per (result, data set): the labels, then the task's metrics."""
    label = [result.get("name", result["encoder"]), result["mode"]]
    if result["task"] == "classification":
        return [label + [result["data"], result["accuracy_pct"]["acc-1"], result["accuracy_pct"]["acc-5"]]]
    if result["task"] == "retrieval":
        by_set = result.get("recall_by_set", {result["data"]: result["recall_pct"]})
        return [label + [name] + [recall[k] for k in RECALL_NAMES] for name, recall in by_set.items()]
    return [label + [name, s.get("BLEU-4"), s.get("CIDEr")] for name, s in result["scores_by_set"].items()]


METRIC_GROUPS = {"classification": ("data", [("classification", ["acc-1", "acc-5"])]),
                 "retrieval": ("data", [("retrieval", RECALL_NAMES)]),
                 "captioning": ("test set", [("captioning", ["B@4", "CIDEr"])])}


def results_table(results: Sequence[dict]) -> str:
    """The results of one task (classification, retrieval or captioning) as a table, a row per model
    and data set."""
    data_column, groups = METRIC_GROUPS[results[0]["task"]]
    return format_table(["Vision encoder", "transfer", data_column], groups, [row for r in results for row in _rows(r)])


def _log_line(label: str, log: dict) -> Optional[str]:
    if not log.get("count"):
        return None
    kinds = ", ".join(f"{k} {n}" for k, n in sorted(log.get("by_reason", {}).items(), key=lambda kv: (-kv[1], kv[0])))
    return f"  {label}: {log['count']} ({kinds})"


def bad_samples_lines(bad_samples: dict) -> List[str]:
    """The results' `bad_samples` ({train_index: log, test_index: {set: log}, ...}) as lines of counts
    by reason; ["bad samples: none"] when nothing was left out."""
    lines = []
    for part, value in bad_samples.items():
        label = part.replace("_", " ")
        nested = value if "count" not in value else {None: value}
        for name, log in nested.items():
            line = _log_line(f"{label} {name}" if name else label, log)
            if line:
                lines.append(line)
    if not lines:
        return ["bad samples: none"]
    return ["bad samples (left out; the first 50 are named in the results JSON):"] + lines


def predictions_path(output: str, set_name: str) -> str:
    """Beside the metrics JSON: out/cap.json + "dataset_coco.json:test" -> out/cap.predictions.dataset_coco_test.json
    (a pairs set "data/pairs.jsonl" -> out/cap.predictions.pairs.json)."""
    stem = output[:-len(".json")] if output.endswith(".json") else output
    name = re.sub(r"\.(jsonl|json|tar)(?=$|:)", "", os.path.basename(set_name.rstrip("/"))).replace(":", "_")
    slug = "".join(c if c.isalnum() or c in "-_+." else "_" for c in name).strip("_.") or "test"
    return f"{stem}.predictions.{slug}.json"


def write_json(path: Optional[str], obj, indent: Optional[int] = 1) -> None:
    """`obj` as JSON at `path` (its folder made; nothing when `path` is empty)."""
    if not path:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=indent)
        if indent is not None:
            f.write("\n")
