"""VQAv2 (Goyal et al. 2017) as released: `v2_OpenEnded_mscoco_<split>_questions.json`
(`{"data_subtype": "val2014", "questions": [{"question_id", "image_id", "question"}]}`), beside it
`v2_mscoco_<split>_annotations.json` (`{"annotations": [{"question_id", "answer_type", "answers":
[{"answer"} x 10]}]}`; none for test-dev: then only the submission is written) and the COCO images
`COCO_<data_subtype>_<image_id:012d>.jpg` under `image_root` (default: `<folder>/<data_subtype>`).

Prompt (LLaVA-1.5): the question + "\\nAnswer the question using a single word or phrase."

Score: the official `vqaEval.py` arithmetic. A prediction's accuracy against the 10 human answers is
the mean, over the 10 subsets of 9 annotators, of min(#matches in the subset / 3, 1); answers are
normalised (punctuation, number words -> digits, articles dropped, contractions restored) exactly as
the official code does, including its quirk of normalising only when the annotators disagree. The
model's answer is first normalised the same way (LLaVA's EvalAI answer processor does this before
submitting), and that is what the submission holds: `[{"question_id", "answer"}]`.
"""

import json
import os
import re
from typing import Dict, List, Optional

from megatron_lcl.eval.benchmarks.base import Answers, Benchmark, Question, answered, percent, register
from megatron_lcl.eval.errors import InputError

SHORT_ANSWER = "\nAnswer the question using a single word or phrase."

# ---- the official normalisation (VQA API, vqaEval.py), tables as released ----
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at",
    "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've",
    "someone'dve": "someone'd've", "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've"}
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = ("a", "an", "the")
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?",
               "!")
PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")  # sic: the official pattern
COMMA_STRIP = re.compile(r"(\d)(,)(\d)")


def process_punctuation(text: str) -> str:
    """Official `processPunctuation`: a mark next to a space (or any text with a digit,digit) is
    deleted, else replaced by a space; periods not inside numbers go. (`re.sub`'s 3rd positional
    argument there is `count`, given re.UNICODE = 32: kept, so only the first 32 periods go.)"""
    out = text
    for p in PUNCTUATION:
        if (p + " " in text or " " + p in text) or COMMA_STRIP.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return PERIOD_STRIP.sub("", out, count=int(re.UNICODE))


def process_digit_article(text: str) -> str:
    """Official `processDigitArticle`: lower-case words, number words -> digits, articles dropped,
    contractions restored ("dont" -> "don't")."""
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in ARTICLES]
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def clean(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def normalize_answer(text: str) -> str:
    return process_digit_article(process_punctuation(clean(text)))


def vqa_accuracy(prediction: str, human_answers: List[str]) -> float:
    """In [0, 1]: mean over the leave-one-annotator-out subsets of min(#matches / 3, 1) (vqaEval.py;
    normalisation only when the human answers are not all the same string, as there)."""
    humans = [clean(a) for a in human_answers]
    prediction = clean(prediction)
    if len(set(humans)) > 1:
        humans = [process_digit_article(process_punctuation(a)) for a in humans]
        prediction = process_digit_article(process_punctuation(prediction))
    per_subset = []
    for left_out in range(len(humans)):
        others = humans[:left_out] + humans[left_out + 1:]
        per_subset.append(min(1.0, sum(a == prediction for a in others) / 3))
    return sum(per_subset) / len(per_subset)


# ---- read ----

def prompt(question: str) -> str:
    return question + SHORT_ANSWER


def annotations_path(questions_path: str) -> Optional[str]:
    """`v2_OpenEnded_mscoco_val2014_questions.json` -> `v2_mscoco_val2014_annotations.json` beside it
    (None when there is none: a test split)."""
    folder, name = os.path.split(questions_path)
    m = re.match(r"(?:v2_)?OpenEnded_(\w+?)_questions\.json$", name)
    candidate = os.path.join(folder, f"v2_{m.group(1)}_annotations.json") if m else None
    return candidate if candidate and os.path.isfile(candidate) else None


def load_json(path: str, what: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror or e})") from None
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: not a {what} JSON file ({e.msg} at line {e.lineno})") from None


def read_annotations(path: str) -> Dict[int, dict]:
    data = load_json(path, "VQA annotations")
    if not isinstance(data, dict) or "annotations" not in data:
        raise InputError(f"{path}: no 'annotations' list (a VQAv2 annotations file has one)")
    by_id = {}
    for k, ann in enumerate(data["annotations"]):
        for key in ("question_id", "answers"):
            if key not in ann:
                raise InputError(f"{path}: annotations[{k}]: no '{key}' (has keys {sorted(ann)})")
        by_id[ann["question_id"]] = ann
    return by_id


def check_ids(questions_path: str, ids: List[int], annotations: Dict[int, dict], ann_path: str) -> None:
    """Every question has an annotation and every annotation a question, else name the first that does not."""
    asked = set(ids)
    for k, qid in enumerate(ids):
        if qid not in annotations:
            raise InputError(f"{questions_path}: questions[{k}].question_id {qid} has no annotation in {ann_path} "
                             f"({len(asked - set(annotations))} of {len(asked)} questions lack one)")
    extra = sorted(set(annotations) - asked)
    if extra:
        raise InputError(f"{ann_path}: annotations for question_id {extra[0]} (and {len(extra) - 1} more) are not "
                         f"questions of {questions_path}: the two files are of different splits")


def read(path: str, image_root: Optional[str] = None) -> List[Question]:
    """The questions file (`path`), its annotations beside it when released, the COCO images."""
    data = load_json(path, "VQA questions")
    if not isinstance(data, dict) or "questions" not in data:
        raise InputError(f"{path}: no 'questions' list (a VQAv2 questions file has one)")
    subtype = data.get("data_subtype", "")
    image_root = image_root or os.path.join(os.path.dirname(path), subtype)
    ann_path = annotations_path(path)
    annotations = read_annotations(ann_path) if ann_path else {}
    items = []
    for k, q in enumerate(data["questions"]):
        missing = [f for f in ("question_id", "image_id", "question") if f not in q]
        if missing:
            raise InputError(f"{path}: questions[{k}]: no '{missing[0]}' (has keys {sorted(q)})")
        items.append(q)
    if ann_path:
        check_ids(path, [q["question_id"] for q in items], annotations, ann_path)
    return [Question(key=str(q["question_id"]), prompt=prompt(q["question"]),
                     image=os.path.join(image_root, f"COCO_{subtype}_{int(q['image_id']):012d}.jpg"),
                     truth=[a["answer"] for a in annotations[q["question_id"]]["answers"]] if ann_path else None,
                     meta={"question_id": q["question_id"],
                           "answer_type": annotations.get(q["question_id"], {}).get("answer_type", "all")})
            for q in items]


# ---- score and submission ----

def score(questions: List[Question], answers: Answers) -> dict:
    """VQA accuracy (%) over the answered questions, overall and per answer type."""
    scored = answered(questions, answers)
    by_type: Dict[str, List[float]] = {}
    for q in scored:
        acc = vqa_accuracy(normalize_answer(answers[q.key]), q.truth)
        by_type.setdefault(q.meta["answer_type"], []).append(acc)
    every = [a for accs in by_type.values() for a in accs]
    result = {"accuracy": percent(sum(every), len(every)), "num_scored": len(every)}
    result.update({f"accuracy/{t}": percent(sum(a), len(a)) for t, a in sorted(by_type.items())})
    return result


def submission(questions: List[Question], answers: Answers) -> Dict[str, str]:
    rows = [{"question_id": q.meta["question_id"], "answer": normalize_answer(answers[q.key])}
            for q in questions if q.key in answers]
    return {"vqav2_answers.json": json.dumps(rows)}


BENCHMARK = register(Benchmark("vqav2", read, score, submission,
                               "VQAv2 questions + annotations JSON, COCO images; VQA accuracy (10 annotators)"))
