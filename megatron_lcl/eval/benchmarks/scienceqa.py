"""ScienceQA-IMG (Lu et al. 2022): the test questions that have an image. As released: a folder with
`problems.json` (`{pid: {"question", "choices", "answer": index, "hint", "image": "image.png" | null,
"split"}}`) and `pid_splits.json`; images at `<image_root>/<split>/<pid>/image.png` (default
image_root: the folder; the release's `images/`).

Prompt (LLaVA-1.5): "Context: <hint>\\n" (when there is one) + question + "\\nA. ...\\nB. ..." +
"\\nAnswer with the option's letter from the given choices directly."
Score: LLaVA's `eval_science_qa.py` letter parsing (choices.letter_as_scienceqa), accuracy.
Submission: `{pid: letter}` ("FAILED" where no letter could be read), as its results file.
"""

import json
import os
from typing import Dict, List, Optional

from megatron_lcl.eval.benchmarks.base import Answers, Benchmark, Question, answered, percent, register
from megatron_lcl.eval.benchmarks.choices import LETTER_PROMPT, LETTERS, letter_as_scienceqa, option_lines
from megatron_lcl.eval.benchmarks.vqav2 import load_json
from megatron_lcl.eval.errors import InputError

SPLIT = "test"


def prompt(question: str, choices: List[str], hint: str) -> str:
    context = f"Context: {hint}\n" if hint and hint.strip() else ""
    return f"{context}{question}\n{option_lines(choices)}\n{LETTER_PROMPT}"


def read(path: str, image_root: Optional[str] = None) -> List[Question]:
    problems_file = os.path.join(path, "problems.json") if os.path.isdir(path) else path
    problems = load_json(problems_file, "ScienceQA problems")
    image_root = image_root or os.path.dirname(problems_file)
    questions = []
    for pid, p in problems.items():
        if p.get("split") != SPLIT or not p.get("image"):
            continue  # -IMG: the test questions with an image
        missing = [f for f in ("question", "choices", "answer") if f not in p]
        if missing:
            raise InputError(f"{problems_file}: [{pid!r}]: no '{missing[0]}' (has keys {sorted(p)})")
        if not 0 <= int(p["answer"]) < len(p["choices"]):
            raise InputError(f"{problems_file}: [{pid!r}].answer {p['answer']} is not an index into its "
                             f"{len(p['choices'])} choices")
        questions.append(Question(key=str(pid), prompt=prompt(p["question"], p["choices"], p.get("hint", "")),
                                  image=os.path.join(image_root, SPLIT, str(pid), p["image"]),
                                  truth=LETTERS[int(p["answer"])], meta={"num_options": len(p["choices"])}))
    if not questions:
        raise InputError(f"{problems_file}: no {SPLIT} questions with an image")
    return questions


def score(questions: List[Question], answers: Answers) -> dict:
    scored = answered(questions, answers)
    right = sum(letter_as_scienceqa(answers[q.key], q.meta["num_options"]) == q.truth for q in scored)
    return {"accuracy": percent(right, len(scored)), "num_scored": len(scored)}


def submission(questions: List[Question], answers: Answers) -> Dict[str, str]:
    letters = {q.key: letter_as_scienceqa(answers[q.key], q.meta["num_options"]) or "FAILED"
               for q in questions if q.key in answers}
    return {"scienceqa_img_predictions.json": json.dumps(letters)}


BENCHMARK = register(Benchmark("scienceqa_img", read, score, submission,
                               "ScienceQA problems.json, test questions with an image; option-letter accuracy"))
