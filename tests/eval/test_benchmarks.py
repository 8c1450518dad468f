"""Benchmark scorers against hand-computed planted cases: VQAv2's official normalisation and its
10-choose-9 annotator averaging, GQA exact match, POPE's yes/no reading and F1, ScienceQA and
MMBench option letters (MMBench's circular rounds), MME accuracy+; every reader on its released
layout, bad files named in one line, each submission in its server's format."""

import base64
import csv
import json

import pytest

from eval_fixtures import png
from megatron_lcl.eval.benchmarks import BENCHMARKS, get
from megatron_lcl.eval.benchmarks import mme, pope, vqav2
from megatron_lcl.eval.benchmarks.choices import letter_as_mmbench, letter_as_scienceqa
from megatron_lcl.eval.errors import InputError


def test_registry_names_every_benchmark():
    assert sorted(BENCHMARKS) == ["gqa", "mmbench", "mme", "pope", "scienceqa_img", "vqav2"]
    with pytest.raises(InputError, match="unknown benchmark 'vqa3' \\(known: gqa, mmbench"):
        get("vqa3")


# ------------------------------------------------------------------------------------------ VQAv2

def test_vqa_normalisation_as_the_official_code():
    assert vqav2.normalize_answer("Two.") == "2"  # period stripped, number word -> digit
    assert vqav2.normalize_answer("The dog's toy") == "dog's toy"  # article dropped
    assert vqav2.normalize_answer("yes, it is!") == "yes it is"  # ", " deleted; "!" at the end -> space
    assert vqav2.normalize_answer("3,000") == "3000"  # digit,digit: the comma goes
    assert vqav2.normalize_answer("a/b") == "b"  # "/" -> space, then "a" is an article
    assert vqav2.normalize_answer("dont know") == "don't know"  # contraction restored
    assert vqav2.normalize_answer("  3.5\tmiles\n") == "3.5 miles"  # a period inside a number stays


def test_vqa_accuracy_averages_over_the_ten_leave_one_out_subsets():
    # 2 annotators said yes, 8 no; prediction yes: leaving out a "yes" leaves 1 match (1/3), leaving
    # out a "no" leaves 2 (2/3): (2 x 1/3 + 8 x 2/3) / 10 = 0.6 (not min(2/3, 1) = 0.667)
    assert vqav2.vqa_accuracy("yes", ["yes"] * 2 + ["no"] * 8) == pytest.approx(0.6)
    # one annotator: 0 when they are left out, 1/3 in the 9 other subsets -> 0.3
    assert vqav2.vqa_accuracy("cat", ["cat"] + ["dog"] * 9) == pytest.approx(0.3)
    # 3 matches: min(2/3, 1) when one of them is left out (3x), 1 otherwise (7x) -> 0.9
    assert vqav2.vqa_accuracy("red", ["red"] * 3 + ["blue"] * 7) == pytest.approx(0.9)
    # annotators disagree, so both sides are normalised: "two" == "2" -> 5 + 0 matches ... all >= 3 -> 1.0
    assert vqav2.vqa_accuracy("Two.", ["2"] * 3 + ["two"] * 2 + ["3"] * 5) == 1.0
    # the official quirk: 10 identical answers are not normalised, nor is the prediction
    assert vqav2.vqa_accuracy("two", ["2"] * 10) == 0.0
    assert vqav2.vqa_accuracy(vqav2.normalize_answer("two"), ["2"] * 10) == 1.0  # what score() does


def write_vqa(root, annotated_ids=(1, 2, 3)):
    (root / "val2014").mkdir(parents=True, exist_ok=True)
    questions = [{"question_id": q, "image_id": 7, "question": f"q{q}?"} for q in (1, 2, 3)]
    (root / "v2_OpenEnded_mscoco_val2014_questions.json").write_text(
        json.dumps({"data_subtype": "val2014", "questions": questions}))
    answers = {1: ["yes"] * 2 + ["no"] * 8, 2: ["2"] * 10, 3: ["cat"] + ["dog"] * 9}
    kinds = {1: "yes/no", 2: "number", 3: "other"}
    anns = [{"question_id": q, "image_id": 7, "answer_type": kinds[q],
             "answers": [{"answer": a, "answer_id": k + 1} for k, a in enumerate(answers[q])]} for q in annotated_ids]
    (root / "v2_mscoco_val2014_annotations.json").write_text(json.dumps({"annotations": anns}))
    return root / "v2_OpenEnded_mscoco_val2014_questions.json"


def test_vqav2_reads_the_release_scores_and_writes_the_submission(tmp_path):
    questions = vqav2.read(str(write_vqa(tmp_path)))
    assert [q.key for q in questions] == ["1", "2", "3"]
    assert questions[0].prompt == "q1?\nAnswer the question using a single word or phrase."
    assert questions[0].image == str(tmp_path / "val2014" / "COCO_val2014_000000000007.jpg")
    result = vqav2.score(questions, {"1": "Yes", "2": "two", "3": "cat"})
    # yes/no 0.6, number 1.0 ("two" -> "2" before scoring), other 0.3
    assert result["accuracy"] == pytest.approx(100 * (0.6 + 1.0 + 0.3) / 3)
    assert result["accuracy/yes/no"] == pytest.approx(60) and result["accuracy/other"] == pytest.approx(30)
    assert json.loads(vqav2.submission(questions, {"1": "Yes", "2": "two"})["vqav2_answers.json"]) == [
        {"question_id": 1, "answer": "yes"}, {"question_id": 2, "answer": "2"}]


def test_vqav2_question_ids_that_do_not_match_the_annotations_are_named(tmp_path):
    path = write_vqa(tmp_path, annotated_ids=(1, 3))
    with pytest.raises(InputError) as e:
        vqav2.read(str(path))
    assert str(e.value) == (f"{path}: questions[1].question_id 2 has no annotation in "
                            f"{tmp_path / 'v2_mscoco_val2014_annotations.json'} (1 of 3 questions lack one)")


# ------------------------------------------------------------------------------------------ GQA, POPE

def test_gqa_exact_match_after_normalisation(tmp_path):
    (tmp_path / "q.json").write_text(json.dumps({"201": {"imageId": "n1", "question": "What?", "answer": "left"},
                                                 "202": {"imageId": "n2", "question": "Is it?", "answer": "no"}}))
    bench = get("gqa")
    questions = bench.read(str(tmp_path / "q.json"), None)
    assert questions[0].image == str(tmp_path / "images" / "n1.jpg")
    assert bench.score(questions, {"201": "Left.", "202": "no way"}) == {"accuracy": 50.0, "num_scored": 2}
    assert json.loads(bench.submission(questions, {"201": "Left."})["gqa_predictions.json"]) == [
        {"questionId": "201", "prediction": "left"}]


def test_pope_reads_yes_no_as_llava_and_scores_f1_and_yes_ratio(tmp_path):
    assert pope.yes_or_no("Yes, there is a dog.") == "yes" and pope.yes_or_no("No.") == "no"
    assert pope.yes_or_no("There is not a dog. Yes.") == "no"  # first sentence only
    assert pope.yes_or_no("I think so") == "yes" and pope.yes_or_no("None") == "yes"  # only the words No/no/not
    truth = ["yes"] * 5 + ["no"] * 5
    said = ["Yes", "yes.", "Yes, it is", "No", "There is not", "Yes", "No", "no", "No, it is not", "not at all"]
    lines = [json.dumps({"question_id": k + 1, "image": "x.jpg", "text": f"Is there {k}?", "label": t})
             for k, t in enumerate(truth)]
    (tmp_path / "coco_pope_random.json").write_text("\n".join(lines) + "\n")
    questions = pope.read(str(tmp_path), None)
    assert questions[0].key == "random:1" and questions[0].image == str(tmp_path / "x.jpg")
    result = pope.score(questions, {q.key: a for q, a in zip(questions, said)})
    # TP 3, FN 2, FP 1, TN 4: precision 75, recall 60, F1 = 2*75*60/135, accuracy 70, yes-ratio 4/10
    assert result["random/precision"] == pytest.approx(75) and result["random/recall"] == pytest.approx(60)
    assert result["random/f1"] == pytest.approx(2 * 75 * 60 / 135) == result["f1"]
    assert result["random/accuracy"] == pytest.approx(70) and result["random/yes_ratio"] == pytest.approx(40)
    first = json.loads(pope.submission(questions, {"random:1": "Yes"})["pope_random_answers.jsonl"])
    assert first == {"question_id": 1, "prompt": "Is there 0?", "text": "Yes", "category": "random"}


# ------------------------------------------------------------------------------------------ option letters

def test_option_letters_as_the_reference_scripts_read_them():
    assert letter_as_scienceqa("B", 3) == "B" and letter_as_scienceqa("C. a fish", 3) == "C"
    assert letter_as_scienceqa("The answer is A.", 2) == "A" and letter_as_scienceqa("D", 3) is None
    assert letter_as_scienceqa("b", 3) is None and letter_as_scienceqa("I think B", 3) is None
    options = {"A": "red", "B": "blue", "C": "green"}
    assert letter_as_mmbench("B. blue", options) == "B" and letter_as_mmbench("(C)", options) == "C"
    assert letter_as_mmbench("The answer is blue", options) == "B"  # no letter word: by the option's text
    assert letter_as_mmbench("A or B", options) is None and letter_as_mmbench("purple", options) is None


def test_scienceqa_img_keeps_test_questions_with_images(tmp_path):
    problems = {"1": {"question": "Which?", "choices": ["x", "y"], "answer": 1, "hint": "Look.", "image": "image.png",
                      "split": "test"},
                "2": {"question": "No image?", "choices": ["x", "y"], "answer": 0, "hint": "", "image": None,
                      "split": "test"},
                "3": {"question": "Train?", "choices": ["x", "y"], "answer": 0, "hint": "", "image": "image.png",
                      "split": "train"}}
    (tmp_path / "problems.json").write_text(json.dumps(problems))
    bench = get("scienceqa_img")
    questions = bench.read(str(tmp_path), None)
    assert [q.key for q in questions] == ["1"] and questions[0].image == str(tmp_path / "test" / "1" / "image.png")
    assert questions[0].prompt == ("Context: Look.\nWhich?\nA. x\nB. y\n"
                                   "Answer with the option's letter from the given choices directly.")
    assert bench.score(questions, {"1": "B"})["accuracy"] == 100.0
    assert bench.score(questions, {"1": "y"})["accuracy"] == 0.0
    assert json.loads(bench.submission(questions, {"1": "y"})["scienceqa_img_predictions.json"]) == {"1": "FAILED"}


def write_mmbench(path, rows):
    image = base64.b64encode(png((200, 0, 0))).decode()
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image"],
                                delimiter="\t")
        writer.writeheader()
        for row in rows:
            writer.writerow(dict({"hint": "nan", "C": "", "D": "", "category": "colour", "image": image}, **row))
    return path


def test_mmbench_circular_evaluation(tmp_path):
    path = write_mmbench(tmp_path / "MMBench_DEV_EN.tsv", [
        {"index": 10, "question": "Colour?", "A": "red", "B": "blue", "C": "green", "answer": "B"},
        {"index": 11, "question": "Shape?", "A": "circle", "B": "square", "answer": "A"}])
    questions = get("mmbench").read(str(path), None)
    assert [q.key for q in questions] == ["10:0", "10:1", "10:2", "11:0", "11:1"]  # n rounds for n options
    # round r rotates the options r places: blue is B, then A, then C
    assert [q.truth for q in questions] == ["B", "A", "C", "A", "B"]
    assert questions[1].prompt.startswith("Colour?\nA. blue\nB. green\nC. red\n")
    assert questions[0].image == png((200, 0, 0))
    # item 10 right in every round; item 11 right in round 0 only
    answers = {"10:0": "B", "10:1": "A. blue", "10:2": "C", "11:0": "A", "11:1": "A"}
    result = get("mmbench").score(questions, answers)
    assert result["circular_accuracy"] == 50.0 and result["single_pass_accuracy"] == 100.0
    assert result["num_items"] == 2 and result["circular_accuracy/colour"] == 50.0
    rows = get("mmbench").submission(questions, answers)["mmbench_predictions.tsv"].splitlines()
    assert rows[0].split("\t")[-1] == "prediction" and [r.split("\t")[-1] for r in rows[1:]] == ["B", "A"]


def test_mmbench_bad_rows_are_named(tmp_path):
    path = write_mmbench(tmp_path / "bad.tsv", [{"index": 1, "question": "Q?", "A": "x", "B": "y", "answer": "C"}])
    with pytest.raises(InputError, match=r"bad.tsv: row 1 \(index 1\): answer 'C' is not one of its options AB"):
        get("mmbench").read(str(path), None)


# ------------------------------------------------------------------------------------------ MME

def test_mme_accuracy_plus_and_score(tmp_path):
    for layout in ("flat", "nested"):
        root = tmp_path / layout / "existence"
        text_dir = root / "questions_answers_YN" if layout == "nested" else root
        image_dir = root / "images" if layout == "nested" else root
        text_dir.mkdir(parents=True), image_dir.mkdir(parents=True, exist_ok=True)
        for k in range(3):
            (image_dir / f"{k}.jpg").write_bytes(b"")
            (text_dir / f"{k}.txt").write_text(f"Is there a cat? Please answer yes or no.\tYes\n"
                                               f"Is there a dog? Please answer yes or no.\tNo\n")
        questions = mme.read(str(tmp_path / layout), None)
        assert len(questions) == 6 and questions[0].image == str(image_dir / "0.jpg")
        # image 0 both right, image 1 one right ("Not sure" reads as "no": "no" in its first 4 letters),
        # image 2 none ("Maybe" is "other")
        said = ["Yes, there is", "no", "Not sure", "No", "Maybe", "yes"]
        result = mme.score(questions, {q.key: a for q, a in zip(questions, said)})
        assert result["existence/accuracy"] == pytest.approx(50.0)  # 3 of 6 questions
        assert result["existence/accuracy_plus"] == pytest.approx(100 / 3)  # 1 of 3 images
        assert result["existence/score"] == pytest.approx(50 + 100 / 3) == result["Perception"]
        files = mme.submission(questions, {q.key: a for q, a in zip(questions, said)})
        assert files["mme/existence.txt"].splitlines()[0] == (
            "0.jpg\tIs there a cat? Please answer yes or no.\tYes\tYes, there is")
