"""GQA (Hudson & Manning 2019) as released: `testdev_balanced_questions.json` = `{question_id:
{"imageId", "question", "answer", ...}}` and the images `<imageId>.jpg` under `image_root`
(default: `<folder>/images`). The test split has no "answer": then only the submission is written.

Prompt (LLaVA-1.5): the question + "\\nAnswer the question using a single word or phrase."

Score: GQA's `eval.py` accuracy, the exact match of prediction and answer, the prediction
normalised as LLaVA's `convert_gqa_for_eval.py` does (trailing periods dropped, lower-cased).
Submission (what `eval.py` and the GQA server read): `[{"questionId", "prediction"}]`.
"""

import json
import os
from typing import Dict, List, Optional

from megatron_lcl.eval.benchmarks.base import Answers, Benchmark, Question, answered, percent, register
from megatron_lcl.eval.benchmarks.vqav2 import SHORT_ANSWER, load_json
from megatron_lcl.eval.errors import InputError


def normalize(prediction: str) -> str:
    return prediction.strip().rstrip(".").lower()


def prompt(question: str) -> str:
    return question + SHORT_ANSWER


def read(path: str, image_root: Optional[str] = None) -> List[Question]:
    data = load_json(path, "GQA questions")
    if not isinstance(data, dict):
        raise InputError(f"{path}: not a GQA questions file (a JSON object of question id -> question)")
    image_root = image_root or os.path.join(os.path.dirname(path), "images")
    questions = []
    for qid, q in data.items():
        missing = [f for f in ("imageId", "question") if f not in q]
        if missing:
            raise InputError(f"{path}: [{qid!r}]: no '{missing[0]}' (has keys {sorted(q)})")
        questions.append(Question(key=str(qid), prompt=prompt(q["question"]),
                                  image=os.path.join(image_root, f"{q['imageId']}.jpg"),
                                  truth=q.get("answer"), meta={"question_id": qid}))
    return questions


def score(questions: List[Question], answers: Answers) -> dict:
    scored = answered(questions, answers)
    right = sum(normalize(answers[q.key]) == q.truth for q in scored)
    return {"accuracy": percent(right, len(scored)), "num_scored": len(scored)}


def submission(questions: List[Question], answers: Answers) -> Dict[str, str]:
    rows = [{"questionId": q.meta["question_id"], "prediction": normalize(answers[q.key])}
            for q in questions if q.key in answers]
    return {"gqa_predictions.json": json.dumps(rows)}


BENCHMARK = register(Benchmark("gqa", read, score, submission,
                               "GQA balanced questions JSON + images; exact-match accuracy"))
