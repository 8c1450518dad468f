"""POPE (Li et al. 2023) as released: one JSON-lines file per split, `coco_pope_<split>.json`
(random, popular, adversarial), each line `{"question_id", "image", "text", "label": "yes"|"no"}`;
`path` is one such file or a folder of them; images are relative to `image_root` (default: the
file's folder).

Prompt (LLaVA-1.5): the text + "\\nAnswer the question using a single word or phrase."

Score: LLaVA's `eval_pope.py`, per split: the answer's first sentence (up to a period), commas
removed, is "no" when one of its space-separated words is "No", "no" or "not", else "yes"; then
accuracy, precision, recall and F1 with "yes" as the positive class, and the yes-ratio (the share of
"yes" answers). The splits' F1 mean is the headline number LLaVA-1.5 reports.
Submission: LLaVA's answers file, JSON lines `{"question_id", "prompt", "text", "category"}` per split.
"""

import glob
import json
import os
import re
from typing import Dict, List, Optional

from megatron_lcl.eval.benchmarks.base import Answers, Benchmark, Question, answered, percent, register
from megatron_lcl.eval.benchmarks.vqav2 import SHORT_ANSWER
from megatron_lcl.eval.errors import InputError

LABELS = ("yes", "no")


def yes_or_no(text: str) -> str:
    """eval_pope.py's reading of an answer."""
    if text.find(".") != -1:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def prompt(text: str) -> str:
    return text + SHORT_ANSWER


def split_name(path: str) -> str:
    m = re.search(r"pope_(\w+)\.jsonl?$", os.path.basename(path))
    return m.group(1) if m else os.path.splitext(os.path.basename(path))[0]


def read_split(path: str, image_root: Optional[str]) -> List[Question]:
    split, root = split_name(path), image_root or os.path.dirname(path)
    questions = []
    with open(path) as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{path}: line {line_no}: not JSON ({e.msg})") from None
            missing = [k for k in ("question_id", "image", "text") if k not in row]
            if missing:
                raise InputError(f"{path}: line {line_no}: no '{missing[0]}' (has keys {sorted(row)})")
            if row.get("label") is not None and row["label"] not in LABELS:
                raise InputError(f"{path}: line {line_no}: label {row['label']!r} is not 'yes' or 'no'")
            questions.append(Question(key=f"{split}:{row['question_id']}", prompt=prompt(row["text"]),
                                      image=os.path.join(root, row["image"]), truth=row.get("label"),
                                      meta={"split": split, "question_id": row["question_id"], "text": row["text"]}))
    return questions


def read(path: str, image_root: Optional[str] = None) -> List[Question]:
    files = sorted(glob.glob(os.path.join(path, "*pope_*.json*"))) if os.path.isdir(path) else [path]
    if not files:
        raise InputError(f"{path}: no POPE split files here (coco_pope_<split>.json)")
    return [q for f in files for q in read_split(f, image_root)]


def binary_metrics(predicted: List[str], truth: List[str]) -> dict:
    """Accuracy, precision, recall, F1 ("yes" positive) and yes-ratio, in percent."""
    tp = sum(p == "yes" and t == "yes" for p, t in zip(predicted, truth))
    fp = sum(p == "yes" and t == "no" for p, t in zip(predicted, truth))
    tn = sum(p == "no" and t == "no" for p, t in zip(predicted, truth))
    fn = sum(p == "no" and t == "yes" for p, t in zip(predicted, truth))
    precision, recall = percent(tp, tp + fp), percent(tp, tp + fn)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"accuracy": percent(tp + tn, len(truth)), "precision": precision, "recall": recall, "f1": f1,
            "yes_ratio": percent(tp + fp, len(truth)), "num_scored": len(truth)}


def score(questions: List[Question], answers: Answers) -> dict:
    by_split: Dict[str, list] = {}
    for q in answered(questions, answers):
        by_split.setdefault(q.meta["split"], []).append((yes_or_no(answers[q.key]), q.truth))
    result = {}
    for split, pairs in sorted(by_split.items()):
        metrics = binary_metrics([p for p, _ in pairs], [t for _, t in pairs])
        result.update({f"{split}/{k}": v for k, v in metrics.items()})
    if by_split:
        result["f1"] = sum(result[f"{s}/f1"] for s in by_split) / len(by_split)
        result["accuracy"] = sum(result[f"{s}/accuracy"] for s in by_split) / len(by_split)
    return result


def submission(questions: List[Question], answers: Answers) -> Dict[str, str]:
    files: Dict[str, List[str]] = {}
    for q in questions:
        if q.key in answers:
            row = {"question_id": q.meta["question_id"], "prompt": q.meta["text"], "text": answers[q.key],
                   "category": q.meta["split"]}
            files.setdefault(f"pope_{q.meta['split']}_answers.jsonl", []).append(json.dumps(row))
    return {name: "\n".join(rows) + "\n" for name, rows in files.items()}


BENCHMARK = register(Benchmark("pope", read, score, submission,
                               "POPE coco_pope_<split>.json lines; accuracy, F1, yes-ratio per split"))
