"""MMBench (Liu et al. 2023) as released: a TSV (`MMBench_DEV_EN.tsv`) with columns `index`,
`question`, `hint`, `A`..`D` (empty where an item has fewer options), `answer` (absent in the test
split: then only the submission is written), `category`, `l2-category`, `split`, `image` (the
image, base64-encoded).

Circular evaluation: an item with n options is asked n times, the options rotated one place each
round (LLaVA's `model_vqa_mmbench.py --all-rounds`); the item counts as right only when every round
is right. A TSV that already holds the rotated copies (index + k x 1e6, as some releases do) is
asked as it is, grouped by index mod 1e6.

Prompt (LLaVA-1.5): hint + "\\n" (when there is one) + question + "\\nA. ...\\nB. ..." + "\\nAnswer
with the option's letter from the given choices directly."
Score: the option letter read by VLMEvalKit's exact matching (choices.letter_as_mmbench; where that
fails VLMEvalKit asks a judge model, which does not run here: counted wrong); circular accuracy
(the headline number), single-pass (round 0) accuracy, and circular accuracy per category.
Submission: the round-0 rows with the model's raw answer in `prediction` (`mmbench_predictions.tsv`;
the MMBench server takes it as .xlsx: `pandas.read_csv(f, sep="\\t").to_excel(...)`).
"""

import base64
import binascii
import csv
import io
import sys
from typing import Dict, List, Optional

from megatron_lcl.eval.benchmarks.base import Answers, Benchmark, Question, percent, register
from megatron_lcl.eval.benchmarks.choices import LETTER_PROMPT, LETTERS, letter_as_mmbench, option_lines
from megatron_lcl.eval.errors import InputError

COPY_OFFSET = 1_000_000
REQUIRED = ("index", "question", "A", "B", "image")


def is_empty(value: Optional[str]) -> bool:
    return value is None or value.strip() in ("", "nan", "NaN", "None")


def prompt(question: str, options: List[str], hint: Optional[str]) -> str:
    context = "" if is_empty(hint) else f"{hint}\n"
    return f"{context}{question}\n{option_lines(options)}\n{LETTER_PROMPT}"


def read_rows(path: str) -> List[dict]:
    csv.field_size_limit(sys.maxsize)  # base64 images are long fields
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f, delimiter="\t"))
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror or e})") from None
    if not rows:
        raise InputError(f"{path}: no rows")
    missing = [c for c in REQUIRED if c not in rows[0]]
    if missing:
        raise InputError(f"{path}: no '{missing[0]}' column (columns: {', '.join(rows[0])})")
    return rows


def decode_image(path: str, row_no: int, row: dict) -> bytes:
    try:
        return base64.b64decode(row["image"], validate=True)
    except (binascii.Error, ValueError):
        raise InputError(f"{path}: row {row_no} (index {row['index']}): 'image' is not base64") from None


def item_questions(path: str, row_no: int, row: dict, rounds: int) -> List[Question]:
    """The `rounds` rotations of one row (1: as it is)."""
    options = [row[c] for c in LETTERS if c in row and not is_empty(row[c])]
    answer = row.get("answer")
    if not is_empty(answer) and answer not in LETTERS[:len(options)]:
        raise InputError(f"{path}: row {row_no} (index {row['index']}): answer {answer!r} is not one of its "
                         f"options {LETTERS[:len(options)]}")
    index = int(float(row["index"]))
    image = decode_image(path, row_no, row)
    out = []
    for r in range(rounds):
        rotated = options[r:] + options[:r]
        truth = None if is_empty(answer) else LETTERS[(LETTERS.index(answer) - r) % len(options)]
        out.append(Question(key=f"{index}:{r}", prompt=prompt(row["question"], rotated, row.get("hint")),
                            image=image, truth=truth,
                            meta={"group": index % COPY_OFFSET, "round": r + index // COPY_OFFSET,
                                  "options": dict(zip(LETTERS, rotated)), "category": row.get("category", ""),
                                  "row": {k: v for k, v in row.items() if k != "image"}}))
    return out


def read(path: str, image_root: Optional[str] = None, circular: bool = True) -> List[Question]:
    rows = read_rows(path)
    has_copies = any(int(float(r["index"])) >= COPY_OFFSET for r in rows)
    questions = []
    for row_no, row in enumerate(rows, 1):
        n = sum(c in row and not is_empty(row[c]) for c in LETTERS)
        questions += item_questions(path, row_no, row, n if circular and not has_copies else 1)
    return questions


def score(questions: List[Question], answers: Answers) -> dict:
    groups: Dict[int, List[bool]] = {}
    first_round: List[bool] = []
    category: Dict[int, str] = {}
    for q in questions:
        if q.truth is None:
            continue
        right = q.key in answers and letter_as_mmbench(answers[q.key], q.meta["options"]) == q.truth
        groups.setdefault(q.meta["group"], []).append(right)
        category[q.meta["group"]] = q.meta["category"]
        if q.meta["round"] == 0:
            first_round.append(right)
    circular = {g: all(r) for g, r in groups.items()}
    result = {"circular_accuracy": percent(sum(circular.values()), len(circular)),
              "single_pass_accuracy": percent(sum(first_round), len(first_round)), "num_items": len(circular)}
    for name in sorted(set(category.values()) - {""}):
        mine = [circular[g] for g in circular if category[g] == name]
        result[f"circular_accuracy/{name}"] = percent(sum(mine), len(mine))
    return result


def submission(questions: List[Question], answers: Answers) -> Dict[str, str]:
    rows = [dict(q.meta["row"], prediction=answers[q.key]) for q in questions
            if q.meta["round"] == 0 and q.key in answers]
    if not rows:
        return {}
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]), delimiter="\t", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return {"mmbench_predictions.tsv": out.getvalue()}


BENCHMARK = register(Benchmark("mmbench", read, score, submission,
                               "MMBench TSV (base64 images); circular option-letter accuracy"))
