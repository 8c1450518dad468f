"""What every benchmark module provides, and the registry that names them (STYLE.md item 14).

A benchmark is three parts, each a plain function of its module:

- `read(path, image_root) -> [Question]`: its released files as they are distributed (question ids
  checked against the annotations; an entry the reader cannot use is an InputError naming the file,
  the entry and the field);
- `prompt(...)`: the user turn LLaVA-1.5's evaluation scripts build for it (without the image tag);
- `score(questions, answers) -> {metric: value}`: the official scorer's arithmetic on the model's raw
  answers (`answers`: {question key: generated text}); percentages in [0, 100];
- `submission(questions, answers) -> {file name: text}`: the predictions in the format its
  evaluation server or official tool takes.

The training loop and the model never know which benchmark runs: `dialogue.evaluate` asks the
registry for one by name, generates an answer per `Question.prompt` and hands them back.
"""

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Union

Answers = Dict[str, str]  # Question.key -> the model's answer text


@dataclass
class Question:
    """One question as the model sees it. `key` is unique within the benchmark run (e.g. MMBench's
    circular rounds share an `index` but not a key); `image` is a file path, encoded image bytes or
    None (a text-only question); `truth` is what the scorer compares with (None: the split has no
    public answers, only the submission is written); `meta` holds what the scorer and the
    submission format need besides (the split, the answer type, the option letters, ...)."""

    key: str
    prompt: str
    image: Union[str, bytes, None]
    truth: object = None
    meta: dict = field(default_factory=dict)

    def origin(self, benchmark: str) -> str:
        return f"{benchmark}:{self.key}"


@dataclass(frozen=True)
class Benchmark:
    name: str
    read: Callable[[str, Optional[str]], List[Question]]
    score: Callable[[List[Question], Answers], dict]
    submission: Callable[[List[Question], Answers], Dict[str, str]]
    about: str  # one line: the released format and the metric


BENCHMARKS: Dict[str, Benchmark] = {}


def register(benchmark: Benchmark) -> Benchmark:
    assert benchmark.name not in BENCHMARKS, f"benchmark {benchmark.name!r} registered twice"
    BENCHMARKS[benchmark.name] = benchmark
    return benchmark


def percent(numerator: float, denominator: float) -> float:
    return 100.0 * numerator / denominator if denominator else 0.0


def answered(questions: List[Question], answers: Answers) -> List[Question]:
    """The questions that have an answer and public ground truth (what a local score covers)."""
    return [q for q in questions if q.key in answers and q.truth is not None]
