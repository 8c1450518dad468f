"""Benchmark scorers for multi-modal dialogue, one module per benchmark, registered by name
(`BENCHMARKS`, `get`): each reads its released format, builds LLaVA-1.5's prompt, scores as its
official scorer does and writes its submission format (base.py says what each part is).

    from megatron_lcl.eval.benchmarks import get
    bench = get("vqav2")
    questions = bench.read("vqav2/v2_OpenEnded_mscoco_val2014_questions.json", None)
    metrics = bench.score(questions, {q.key: answer for q, answer in ...})
"""

from megatron_lcl.eval.benchmarks import gqa, mmbench, mme, pope, scienceqa, vqav2  # noqa: F401 (register)
from megatron_lcl.eval.benchmarks.base import BENCHMARKS, Answers, Benchmark, Question
from megatron_lcl.eval.errors import InputError


def get(name: str) -> Benchmark:
    if name not in BENCHMARKS:
        raise InputError(f"unknown benchmark {name!r} (known: {', '.join(sorted(BENCHMARKS))})")
    return BENCHMARKS[name]


__all__ = ["BENCHMARKS", "Answers", "Benchmark", "Question", "get"]
