"""A synthetic multi-modal dialogue corpus drawn from the two-object scenes (`data/scenes.py`,
its defaults unchanged), written in exactly the released formats, so every reader, scorer and
command of the dialogue task runs end to end in minutes on a CPU:

    python -m megatron_lcl.eval.dialogue.synthetic --output data/dialogue --train-images 2000

    OUT/images/scene_0000001.jpg                 training images
    OUT/stage1.json                              LLaVA caption pairs (the LCS-558K format)
    OUT/stage2.json                              LLaVA instruction data (the LLaVA-665K format):
                                                 multi-turn questions about one image + text-only entries
    OUT/eval/vqav2/v2_OpenEnded_mscoco_val2014_questions.json, v2_mscoco_val2014_annotations.json,
                 val2014/COCO_val2014_<id:012d>.jpg   (10 annotator answers each, some in other words)
    OUT/eval/gqa/testdev_balanced_questions.json, images/<imageId>.jpg
    OUT/eval/pope/coco_pope_{random,popular,adversarial}.json (+ the images beside them)
    OUT/eval/mmbench/MMBench_DEV_EN.tsv           (base64 images; options A-D)
    OUT/eval/mme/{existence,count,position,color}/<image>.jpg + .txt

A scene shows object A (one or two copies) left of / above object B. Questions ask for a shape or a
colour by position ("What shape is on the left?"), a count, or the relation, with short answers;
POPE asks "Is there a <colour> <shape> in the image?" (negatives: random absent objects; popular:
the most frequent absent objects; adversarial: absent objects sharing a shape or colour with one
shown). The evaluation images are new draws (their own random stream), never training images.
"""

import argparse
import base64
import csv
import io
import json
import os
import random
from collections import Counter
from typing import Dict, List, Tuple

from megatron_lcl.data import scenes

CAPTION_PROMPTS = ("Describe the image concisely.", "Give a brief description of the image.",
                   "Write a short caption for this picture.", "What does the image show? Answer briefly.")
TEXT_ONLY = (("How many sides does a square have?", "4"), ("How many sides does a triangle have?", "3"),
             ("Name a colour of the sky on a clear day.", "blue"), ("What colour is grass?", "green"),
             ("Which shape is round?", "circle"), ("What colour do bananas turn when ripe?", "yellow"),
             ("Is a cross a shape with four arms?", "yes"), ("Is a circle a shape with corners?", "no"))
SHORT = "\nAnswer the question using a single word or phrase."
OBJECTS = [(s, c) for s in range(len(scenes.SHAPES)) for c in range(len(scenes.COLOURS))]


# ------------------------------------------------------------------------------------------ scenes

def positions(scene: dict) -> Tuple[str, str]:
    """Where A and B are: ("left", "right") or ("top", "bottom")."""
    return ("left", "right") if scene["relation"] == 0 else ("top", "bottom")


def name(obj) -> str:
    return f"{scenes.COLOURS[obj[1]]} {scenes.SHAPES[obj[0]]}"


def plural(shape: int) -> str:
    word = scenes.SHAPES[shape]
    return word + ("es" if word.endswith("s") else "s")


def qa_pairs(scene: dict) -> List[dict]:
    """Every short-answer question about a scene: {type, question, answer, alternatives}."""
    a, b = scene["a"], scene["b"]
    where_a, where_b = positions(scene)
    count = scene["count"] + 1
    relation = scenes.RELATIONS[scene["relation"]]
    return [
        {"type": "shape", "question": f"What shape is on the {where_a}?", "answer": scenes.SHAPES[a[0]]},
        {"type": "shape", "question": f"What shape is on the {where_b}?", "answer": scenes.SHAPES[b[0]]},
        {"type": "colour", "question": f"What colour is the object on the {where_a}?", "answer": scenes.COLOURS[a[1]]},
        {"type": "colour", "question": f"What colour is the object on the {where_b}?", "answer": scenes.COLOURS[b[1]]},
        {"type": "count", "question": f"How many {scenes.COLOURS[a[1]]} {plural(a[0])} are there?",
         "answer": str(count), "alternatives": [scenes.COUNTS[scene["count"]]]},
        {"type": "relation", "question": f"Where is the {name(a)} relative to the {name(b)}?",
         "answer": relation.split()[0], "alternatives": [relation]},
    ]


def draw(scene: dict, image_size: int, rng: random.Random) -> bytes:
    buf = io.BytesIO()
    scenes.draw_scene(scene, image_size, rng).save(buf, format="JPEG", quality=92)
    return buf.getvalue()


def make_scenes(n: int, seed: str, image_size: int) -> List[Tuple[dict, bytes]]:
    out = []
    for i in range(n):
        rng = random.Random(f"{seed}-{i}")
        scene = scenes.sample_scene(rng, "train")
        out.append((scene, draw(scene, image_size, rng)))
    return out


# ------------------------------------------------------------------------------------------ training data

def turn(role: str, value: str) -> dict:
    return {"from": role, "value": value}


def stage1_entry(k: int, image: str, scene: dict, rng: random.Random) -> dict:
    prompt = CAPTION_PROMPTS[rng.randrange(len(CAPTION_PROMPTS))]
    if rng.random() < 0.5:  # LCS-558K puts the image tag before or after the instruction
        human = f"<image>\n{prompt}"
    else:
        human = f"{prompt}\n<image>"
    return {"id": f"{k:07d}", "image": image,
            "conversations": [turn("human", human), turn("gpt", scenes.describe(scene))]}


def stage2_entry(k: int, image: str, scene: dict, rng: random.Random) -> dict:
    picks = rng.sample(qa_pairs(scene), rng.randint(1, 3))
    conversations = []
    for j, qa in enumerate(picks):
        question = qa["question"] + (SHORT if rng.random() < 0.5 else "")
        conversations += [turn("human", ("<image>\n" if j == 0 else "") + question), turn("gpt", qa["answer"])]
    return {"id": f"{k:07d}", "image": image, "conversations": conversations}


def text_only_entry(k: int, rng: random.Random) -> dict:
    q, a = TEXT_ONLY[rng.randrange(len(TEXT_ONLY))]
    return {"id": f"text_{k:07d}", "conversations": [turn("human", q), turn("gpt", a)]}


def write_training(out: str, items, text_only_fraction: float, seed: int) -> None:
    os.makedirs(os.path.join(out, "images"), exist_ok=True)
    rng = random.Random(f"{seed}-dialogue")
    stage1, stage2 = [], []
    for k, (scene, data) in enumerate(items):
        image = f"images/scene_{k:07d}.jpg"
        with open(os.path.join(out, image), "wb") as f:
            f.write(data)
        stage1.append(stage1_entry(k, image, scene, rng))
        stage2.append(stage2_entry(k, image, scene, rng))
        if rng.random() < text_only_fraction:
            stage2.append(text_only_entry(k, rng))
    for name_, entries in (("stage1.json", stage1), ("stage2.json", stage2)):
        with open(os.path.join(out, name_), "w") as f:
            json.dump(entries, f)


# ------------------------------------------------------------------------------------------ benchmarks

def write_image(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def annotators(qa: dict, rng: random.Random) -> List[str]:
    """10 human answers: mostly the answer, some in other words ("2" / "two", "left" / "left of"), so
    normalisation and the >= 3 matches rule both matter."""
    words = [qa["answer"]] + qa.get("alternatives", [])
    return [words[0] if rng.random() < 0.7 else rng.choice(words) for _ in range(10)]


def write_vqav2(root: str, items, rng: random.Random) -> None:
    questions, annotations = [], []
    for i, (scene, data) in enumerate(items):
        image_id = 100000 + i
        write_image(os.path.join(root, "val2014", f"COCO_val2014_{image_id:012d}.jpg"), data)
        for j, qa in enumerate(rng.sample(qa_pairs(scene), 2)):
            qid = image_id * 10 + j
            questions.append({"image_id": image_id, "question": qa["question"], "question_id": qid})
            answers = [{"answer": a, "answer_confidence": "yes", "answer_id": n + 1}
                       for n, a in enumerate(annotators(qa, rng))]
            annotations.append({"question_id": qid, "image_id": image_id, "question_type": qa["type"],
                                "answer_type": "number" if qa["type"] == "count" else "other",
                                "multiple_choice_answer": qa["answer"], "answers": answers})
    with open(os.path.join(root, "v2_OpenEnded_mscoco_val2014_questions.json"), "w") as f:
        json.dump({"task_type": "Open-Ended", "data_type": "mscoco", "data_subtype": "val2014",
                   "questions": questions}, f)
    with open(os.path.join(root, "v2_mscoco_val2014_annotations.json"), "w") as f:
        json.dump({"data_type": "mscoco", "data_subtype": "val2014", "annotations": annotations}, f)


def write_gqa(root: str, items, rng: random.Random) -> None:
    questions = {}
    for i, (scene, data) in enumerate(items):
        image_id = f"n{i:06d}"
        write_image(os.path.join(root, "images", f"{image_id}.jpg"), data)
        for j, qa in enumerate(rng.sample(qa_pairs(scene), 2)):
            questions[f"{i:06d}{j}"] = {"imageId": image_id, "question": qa["question"], "answer": qa["answer"],
                                        "fullAnswer": f"The answer is {qa['answer']}.", "types": {"semantic": qa["type"]}}
    with open(os.path.join(root, "testdev_balanced_questions.json"), "w") as f:
        json.dump(questions, f)


def shown(scene: dict) -> set:
    return {scene["a"], scene["b"]}


def pope_negative(scene: dict, split: str, popular: List[tuple], rng: random.Random) -> tuple:
    absent = [o for o in OBJECTS if o not in shown(scene)]
    if split == "popular":
        return next(o for o in popular if o not in shown(scene))
    if split == "adversarial":
        confusable = [o for o in absent if any(o[0] == s[0] or o[1] == s[1] for s in shown(scene))]
        return rng.choice(confusable or absent)
    return rng.choice(absent)


def write_pope(root: str, items, popular: List[tuple], rng: random.Random) -> None:
    for i, (_, data) in enumerate(items):
        write_image(os.path.join(root, f"COCO_val2014_{100000 + i:012d}.jpg"), data)
    for split in ("random", "popular", "adversarial"):
        lines, qid = [], 0
        for i, (scene, _) in enumerate(items):
            present = rng.choice(sorted(shown(scene)))
            for obj, label in ((present, "yes"), (pope_negative(scene, split, popular, rng), "no")):
                qid += 1
                lines.append(json.dumps({"question_id": qid, "image": f"COCO_val2014_{100000 + i:012d}.jpg",
                                         "text": f"Is there a {name(obj)} in the image?", "label": label}))
        with open(os.path.join(root, f"coco_pope_{split}.json"), "w") as f:
            f.write("\n".join(lines) + "\n")


def choices_for(qa: dict, rng: random.Random) -> List[str]:
    pool = {"shape": scenes.SHAPES, "colour": scenes.COLOURS, "count": ("1", "2", "3", "4"),
            "relation": ("left", "above", "right", "below")}[qa["type"]]
    options = list(pool)
    rng.shuffle(options)
    return options


def write_mmbench(root: str, items, rng: random.Random) -> None:
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, "MMBench_DEV_EN.tsv"), "w", newline="") as f:
        writer = csv.DictWriter(f, ["index", "question", "hint", "A", "B", "C", "D", "answer", "category",
                                    "l2-category", "split", "image"], delimiter="\t", lineterminator="\n")
        writer.writeheader()
        for i, (scene, data) in enumerate(items):
            qa = rng.choice(qa_pairs(scene))
            options = choices_for(qa, rng)
            writer.writerow({"index": i, "question": qa["question"], "hint": "nan",
                             **dict(zip("ABCD", options)), "answer": "ABCD"[options.index(qa["answer"])],
                             "category": qa["type"], "l2-category": "perception", "split": "dev",
                             "image": base64.b64encode(data).decode()})


def mme_questions(scene: dict, rng: random.Random) -> Dict[str, List[Tuple[str, str]]]:
    """Per MME subtask, one question answered Yes and one answered No about the scene."""
    a, b = scene["a"], scene["b"]
    absent = rng.choice([o for o in OBJECTS if o not in shown(scene)])
    where_a, _ = positions(scene)
    wrong_colour = rng.choice([c for c in scenes.COLOURS if c != scenes.COLOURS[a[1]]])
    count = scene["count"] + 1
    yn = " Please answer yes or no."
    return {
        "existence": [(f"Is there a {name(a)} in this image?{yn}", "Yes"), (f"Is there a {name(absent)} in this image?{yn}", "No")],
        "count": [(f"Are there {count} {scenes.COLOURS[a[1]]} objects of shape {scenes.SHAPES[a[0]]} in the image?{yn}", "Yes"),
                  (f"Are there {3 - count} {scenes.COLOURS[a[1]]} objects of shape {scenes.SHAPES[a[0]]} in the image?{yn}", "No")],
        "position": [(f"Is the {name(a)} on the {where_a} of the image?{yn}", "Yes"),
                     (f"Is the {name(b)} on the {where_a} of the image?{yn}", "No")],
        "color": [(f"Is the object on the {where_a} {scenes.COLOURS[a[1]]}?{yn}", "Yes"),
                  (f"Is the object on the {where_a} {wrong_colour}?{yn}", "No")],
    }


def write_mme(root: str, items, rng: random.Random) -> None:
    for i, (scene, data) in enumerate(items):
        for subtask, pairs in mme_questions(scene, rng).items():
            folder = os.path.join(root, subtask)
            write_image(os.path.join(folder, f"{i:06d}.jpg"), data)
            with open(os.path.join(folder, f"{i:06d}.txt"), "w") as f:
                f.write("".join(f"{q}\t{a}\n" for q, a in pairs))


def write_benchmarks(out: str, items, popular: List[tuple], seed: int) -> None:
    rng = random.Random(f"{seed}-benchmarks")
    write_vqav2(os.path.join(out, "vqav2"), items, rng)
    write_gqa(os.path.join(out, "gqa"), items, rng)
    write_pope(os.path.join(out, "pope"), items, popular, rng)
    write_mmbench(os.path.join(out, "mmbench"), items, rng)
    write_mme(os.path.join(out, "mme"), items, rng)


# ------------------------------------------------------------------------------------------ the corpus

def write_dialogue_corpus(out: str, train_images: int = 2000, eval_images: int = 200, image_size: int = 32,
                          seed: int = 0, text_only_fraction: float = 0.1) -> dict:
    """Write the corpus (module doc) -> {name: path} of its parts."""
    train = make_scenes(train_images, f"{seed}-train", image_size)
    write_training(out, train, text_only_fraction, seed)
    frequency = Counter(o for scene, _ in train for o in shown(scene))
    popular = [o for o, _ in frequency.most_common()] + [o for o in OBJECTS if o not in frequency]
    write_benchmarks(os.path.join(out, "eval"), make_scenes(eval_images, f"{seed}-eval", image_size), popular, seed)
    ev = os.path.join(out, "eval")
    return {"stage1": os.path.join(out, "stage1.json"), "stage2": os.path.join(out, "stage2.json"),
            "image_root": out, "vqav2": os.path.join(ev, "vqav2", "v2_OpenEnded_mscoco_val2014_questions.json"),
            "gqa": os.path.join(ev, "gqa", "testdev_balanced_questions.json"), "pope": os.path.join(ev, "pope"),
            "mmbench": os.path.join(ev, "mmbench", "MMBench_DEV_EN.tsv"), "mme": os.path.join(ev, "mme")}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output", required=True)
    p.add_argument("--train-images", type=int, default=2000)
    p.add_argument("--eval-images", type=int, default=200)
    p.add_argument("--image-size", type=int, default=32, help="pixels (the tiny encoder's 32)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--text-only-fraction", type=float, default=0.1, help="stage-2 entries without an image")
    args = p.parse_args(argv)
    paths = write_dialogue_corpus(args.output, args.train_images, args.eval_images, args.image_size, args.seed,
                                  args.text_only_fraction)
    for key, path in paths.items():
        print(f"{key:<10} {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
