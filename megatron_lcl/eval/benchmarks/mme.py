"""MME (Fu et al. 2023) as released (`MME_Benchmark_release_version/`): one folder per subtask; in
it either `images/` + `questions_answers_YN/` or the images beside their `.txt` files; each `.txt`
(named as its image) holds two lines `question<TAB>Yes|No`.

Prompt: the question as released (it ends "Please answer yes or no."), as LLaVA-1.5 asks it.
Score: the official `calculation.py`. An answer is "yes"/"no" when it is exactly that (lower-cased),
else by whether "yes" or "no" occurs in its first 4 characters, else "other" (wrong). Per subtask:
accuracy (questions), accuracy+ (images with both questions right), score = accuracy + accuracy+
(max 200); Perception = the sum over its 10 subtasks, Cognition over its 4 (those present).
Submission: the official tool's input, one `<subtask>.txt` per subtask with lines
`image<TAB>question<TAB>ground truth<TAB>prediction`.
"""

import os
from typing import Dict, List, Optional

from megatron_lcl.eval.benchmarks.base import Answers, Benchmark, Question, answered, percent, register
from megatron_lcl.eval.errors import InputError

CATEGORIES = {"Perception": ("existence", "count", "position", "color", "posters", "celebrity", "scene",
                             "landmark", "artwork", "OCR"),
              "Cognition": ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")}
IMAGE_EXTS = (".jpg", ".png", ".jpeg")


def parse_answer(text: str) -> str:
    """calculation.py's `parse_pred_ans` on the lower-cased answer."""
    text = text.lower()
    if text in ("yes", "no"):
        return text
    head = text[:4]
    return "yes" if "yes" in head else "no" if "no" in head else "other"


def pairs_of(subtask_dir: str):
    """(image path, txt path) of a subtask folder, in either released layout."""
    if os.path.isdir(os.path.join(subtask_dir, "questions_answers_YN")):
        text_dir, image_dir = os.path.join(subtask_dir, "questions_answers_YN"), os.path.join(subtask_dir, "images")
    else:
        text_dir = image_dir = subtask_dir
    for name in sorted(n for n in os.listdir(text_dir) if n.endswith(".txt")):
        stem = name[:-4]
        images = [os.path.join(image_dir, stem + e) for e in IMAGE_EXTS if os.path.exists(os.path.join(image_dir, stem + e))]
        yield (images[0] if images else os.path.join(image_dir, stem + ".jpg")), os.path.join(text_dir, name)


def read_pair(subtask: str, image: str, text_file: str) -> List[Question]:
    questions = []
    with open(text_file) as f:
        for line_no, line in enumerate((l for l in f.read().splitlines() if l.strip()), 1):
            question, sep, truth = line.rpartition("\t")
            if not sep or truth.strip().lower() not in ("yes", "no"):
                raise InputError(f"{text_file}: line {line_no}: not 'question<TAB>Yes|No' ({line[:60]!r})")
            questions.append(Question(key=f"{subtask}/{os.path.basename(image)}/{line_no}", prompt=question,
                                      image=image, truth=truth.strip().lower(),
                                      meta={"subtask": subtask, "image_name": os.path.basename(image),
                                            "question": question, "truth_raw": truth.strip()}))
    return questions


def read(path: str, image_root: Optional[str] = None) -> List[Question]:
    subtasks = sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d))) if os.path.isdir(path) else []
    questions = [q for s in subtasks for image, txt in pairs_of(os.path.join(path, s)) for q in read_pair(s, image, txt)]
    if not questions:
        raise InputError(f"{path}: no MME subtask folders with question files (e.g. existence/*.txt)")
    return questions


def subtask_scores(questions: List[Question], answers: Answers) -> Dict[str, dict]:
    per: Dict[str, Dict[str, List[bool]]] = {}
    for q in answered(questions, answers):
        right = parse_answer(answers[q.key]) == q.truth
        per.setdefault(q.meta["subtask"], {}).setdefault(q.meta["image_name"], []).append(right)
    out = {}
    for subtask, images in per.items():
        flat = [r for rs in images.values() for r in rs]
        acc, acc_plus = percent(sum(flat), len(flat)), percent(sum(all(rs) for rs in images.values()), len(images))
        out[subtask] = {"accuracy": acc, "accuracy_plus": acc_plus, "score": acc + acc_plus}
    return out


def score(questions: List[Question], answers: Answers) -> dict:
    per = subtask_scores(questions, answers)
    result = {f"{s}/{k}": v for s, metrics in sorted(per.items()) for k, v in metrics.items()}
    for category, names in CATEGORIES.items():
        present = [n for n in names if n in per]
        if present:
            result[category] = sum(per[n]["score"] for n in present)
    others = sorted(set(per) - {n for names in CATEGORIES.values() for n in names})
    if others:
        result["other_subtasks"] = sum(per[n]["score"] for n in others)
    return result


def submission(questions: List[Question], answers: Answers) -> Dict[str, str]:
    files: Dict[str, List[str]] = {}
    for q in questions:
        if q.key in answers:
            answer = " ".join(answers[q.key].split())  # one line, no tabs
            files.setdefault(f"mme/{q.meta['subtask']}.txt", []).append(
                "\t".join([q.meta["image_name"], q.meta["question"], q.meta["truth_raw"], answer]))
    return {name: "\n".join(lines) + "\n" for name, lines in files.items()}


BENCHMARK = register(Benchmark("mme", read, score, submission,
                               "MME subtask folders (question<TAB>Yes|No); accuracy, accuracy+, score"))
