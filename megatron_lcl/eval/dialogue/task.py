"""Multi-modal dialogue transfer (paper Table 4 / Table 8): LLaVA-1.5's two stages on a pre-trained
vision encoder, on the evaluation wing's one engine (`engine.fit`: data-parallel under torchrun, bf16
on GPU, resumable `--checkpoint`, progress bar, bad samples counted and named), then the benchmarks'
questions answered greedily and scored as their official scorers do (`megatron_lcl.eval.benchmarks`).

    # stage 1 (alignment): the projector only, LLaVA's plain template, caption pairs (LCS-558K)
    python -m megatron_lcl.eval.dialogue --stage 1 --encoder runs/NAME/checkpoints --lm vicuna-7b \
        --data blip_laion_cc_sbu_558k.json --image-root LCS/images --preset paper --checkpoint out/s1.pt
    # stage 2 (instruction tuning): projector + LM (+ the encoder with --mode full), vicuna_v1 template
    python -m megatron_lcl.eval.dialogue --stage 2 --encoder runs/NAME/checkpoints --lm vicuna-7b \
        --projector out/s1.pt --data llava_v1_5_mix665k.json --image-root data --preset paper \
        --checkpoint out/s2.pt --benchmark pope=pope/ mmbench=MMBench_DEV_EN.tsv --export out/llava_hf \
        --output out/s2.json

`--export DIR` writes a HF `LlavaForConditionalGeneration` folder with its processor
(`megatron_lcl.hf.llava`), for the community's evaluators (lmms-eval `llava_hf`, VLMEvalKit): whole,
renamed into place; an existing export is replaced only with `--overwrite`.
`--benchmark NAME=PATH`: any of `megatron_lcl.eval.benchmarks.BENCHMARKS`; with `--output out/s2.json`
each benchmark's submission files go to `out/s2.predictions/<files>` beside the metrics.
"""

import argparse
import os
import sys
import time
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional

import torch

from megatron_lcl.eval import benchmarks
from megatron_lcl.eval.bad_samples import BadSample, BadSampleLog
from megatron_lcl.eval.caption import load_tokenizer
from megatron_lcl.eval.cli import Command, TaskData, add_config_args, common_args, entry_points, parse_with_preset
from megatron_lcl.eval.datasets import SourceImages
from megatron_lcl.eval.dialogue import conversations as conv
from megatron_lcl.eval.dialogue.model import (STRATEGIES, DialogueHead, check_tokenizer, dialogue_encoder, generate,
                                              load_dialogue_lm, load_projector, load_vision_tower, num_image_tokens)
from megatron_lcl.eval.encoders import VisionEncoder, frozen_guard
from megatron_lcl.eval.engine import EngineConfig, TransferModel, autocast, fit
from megatron_lcl.eval.errors import InputError
from megatron_lcl.eval.parallel import all_gather_objects, all_sum, eval_batches, merge_bad_logs, one_process
from megatron_lcl.eval.report import format_table
from megatron_lcl.eval.sources import read_file
from megatron_lcl.runtime.device import device as compute_device
from megatron_lcl.runtime.layout import ParallelLayout

# Paper Table 8 (multi-modal dialogue, LLaVA-1.5's recipe): AdamW betas (0.9, 0.95), wd 1e-4, cosine.
# Stage 1: LCS-558K, 1091 steps of 512, lr 1e-3, 30 warm-up steps; stage 2: LLaVA-665K, 5198 steps of
# 128, lr 2e-5 (the encoder's too in full mode), 156 warm-up steps.
PRESETS_BY_STAGE = {
    1: {"paper": dict(steps=1091, batch_size=512, lr=1e-3, weight_decay=1e-4, adam_beta2=0.95, warmup_steps=30)},
    2: {"paper": dict(steps=5198, batch_size=128, lr=2e-5, encoder_lr=2e-5, weight_decay=1e-4, adam_beta2=0.95,
                      warmup_steps=156)},
}


@dataclass
class DialogueConfig(EngineConfig):
    stage: int = 2  # 1: projector only (plain template); 2: projector + LM (+ encoder in full mode)
    mode: str = "frozen"  # frozen | full (the vision encoder; stage 2 only)
    epochs: int = 1
    batch_size: int = 16
    lr: float = 1e-3  # projector and (stage 2) the LM
    encoder_lr: float = 2e-5  # full mode only
    weight_decay: float = 1e-4
    warmup_epochs: float = 0.03
    template: str = "auto"  # auto: stage 1 plain; stage 2 the LM tokenizer's chat template, else vicuna_v1
    vision_feature_layer: int = -2  # LLaVA-1.5: the penultimate layer
    vision_feature_select_strategy: str = "default"  # default: class token dropped (LLaVA-1.5); full: kept
    max_tokens: int = 512  # a conversation is cut here (LLaVA-1.5: 2048)
    max_new_tokens: int = 16  # answers are short (benchmarks ask for a word, a phrase or a letter)
    eval_batch_size: int = 32
    seed: int = 0


def template_name(cfg: DialogueConfig, tokenizer) -> str:
    """`--template auto`: stage 1 plain; stage 2 the LM tokenizer's chat template when it has one, else vicuna_v1."""
    if cfg.template != "auto":
        return cfg.template
    if cfg.stage == 1:
        return "plain"
    return "chat_template" if getattr(tokenizer, "chat_template", None) else "vicuna_v1"


# ------------------------------------------------------------------------------------------ data

class DialogueImages(SourceImages):
    """Item i -> (pixels `[3, S, S]` or cached features, i, i), or a BadSample; a text-only entry
    (or question) gets a black image that nothing reads (the batch stays one tensor)."""

    def inputs(self, i: int):
        if not self.source.has_image(i) and (self.latents is None or i not in self.latents):
            return torch.zeros(3, self.image_size, self.image_size)
        return super().inputs(i)

    def __getitem__(self, i: int):
        inputs = self.inputs(i)
        return inputs if isinstance(inputs, BadSample) else (inputs, i, i)  # "labels" = the item index


class QuestionSource:
    """A benchmark's questions as a source (images from files, or bytes as MMBench ships them)."""

    def __init__(self, name: str, questions: List[benchmarks.Question]):
        self.name, self.questions = name, questions

    def __len__(self) -> int:
        return len(self.questions)

    def origin(self, i: int) -> str:
        q = self.questions[i]
        return q.image if isinstance(q.image, str) else q.origin(self.name)

    def has_image(self, i: int) -> bool:
        return self.questions[i].image is not None

    def image_bytes(self, i: int):
        image = self.questions[i].image
        return image if isinstance(image, bytes) else read_file(image)


@dataclass
class Tokens:
    """How text becomes the LM's ids here: tokenizer, template (Jinja), image token and count, limits."""

    tokenizer: object
    template: str  # Jinja text
    template_name: str  # plain | vicuna_v1 | chat_template
    image_token_id: int
    num_image_tokens: int
    max_tokens: int

    def training_batch(self, dialogues: List[conv.Dialogue]):
        """-> input_ids, attention_mask, labels `[b, T]` (right-padded), and the dialogues with no target left."""
        rows = [conv.encode(self.tokenizer, self.template, d, self.image_token_id, self.num_image_tokens,
                            self.max_tokens) for d in dialogues]
        width = max(len(r.input_ids) for r in rows)
        ids = torch.full((len(rows), width), self.tokenizer.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), width), conv.IGNORE, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(r.input_ids)
            ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(r.input_ids), torch.tensor(r.labels), 1
        empty = [d for d, r in zip(dialogues, rows) if all(t == conv.IGNORE for t in r.labels)]
        return ids, mask, labels, empty

    def prompt(self, question: benchmarks.Question) -> List[int]:
        user = (f"{conv.IMAGE_TAG}\n" if question.image is not None else "") + question.prompt
        text = conv.prompt_text(self.tokenizer, self.template, user)
        return conv.tokenize(self.tokenizer, text, self.image_token_id, self.num_image_tokens)["input_ids"]


# ------------------------------------------------------------------------------------------ training

def dialogue_step(model, batch: dict, source: conv.DialogueSource, tokens: Tokens, layout: ParallelLayout,
                  bad: BadSampleLog) -> torch.Tensor:
    """CE over the assistant tokens of the global batch: local sum x world / global target count. A
    conversation cut so short that no assistant token is left is counted in `bad`."""
    dialogues = [source.dialogue(i) for i in batch["labels"].tolist()]
    ids, mask, labels, empty = tokens.training_batch(dialogues)
    for d in empty:
        bad.add(d.origin, f"no assistant token within --max-tokens {tokens.max_tokens}")
    device = compute_device()
    loss_sum, count = model(batch["inputs"].to(device), ids.to(device), mask.to(device), labels.to(device))
    total, = all_sum([float(count)], layout)
    return loss_sum * layout.dp_size / max(total, 1.0)


def build_model(encoder: VisionEncoder, lm_path: str, cfg: DialogueConfig, projector: Optional[str]):
    """-> (TransferModel, Tokens): the LM with its image token, a new projector (seeded: equal on every
    rank) or stage 1's, trainable as the stage says."""
    torch.manual_seed(cfg.seed)  # the image token's new embedding row and the projector: equal on every rank
    lm, tokenizer, image_token_id = load_dialogue_lm(lm_path)
    head = DialogueHead(encoder.hidden_size, lm, image_token_id, train_lm=cfg.stage == 2)
    if projector:
        load_projector(head, projector)
    name = template_name(cfg, tokenizer)
    limit = min(cfg.max_tokens, getattr(lm.config, "max_position_embeddings", None) or cfg.max_tokens)
    tokens = Tokens(tokenizer, conv.resolve_template(name, tokenizer), name, image_token_id,
                    num_image_tokens(encoder.module.config, encoder.feature_strategy), limit)
    return TransferModel(encoder, head, cfg.mode), tokens


# ------------------------------------------------------------------------------------------ benchmarks

@torch.no_grad()
def answer_questions(model: TransferModel, tokens: Tokens, name: str, questions: List[benchmarks.Question],
                     cfg: DialogueConfig, layout: ParallelLayout, bad: BadSampleLog) -> benchmarks.Answers:
    """{question key: greedy answer} over all ranks (each answers its share); a question whose image
    cannot be read, or whose prompt and answer would not fit the LM's positions, is left out and
    counted in `bad`."""
    model.eval()
    source = QuestionSource(name, questions)
    mine = {}
    for batch in eval_batches(DialogueImages(source, model.encoder.image_size), cfg.eval_batch_size, layout,
                              cfg.num_workers):
        bad.extend(batch["bad"])
        prompts = {i: tokens.prompt(questions[i]) for i in batch["index"].tolist()}
        fits = [len(p) + cfg.max_new_tokens <= tokens.max_tokens for p in prompts.values()]
        for i, ok in zip(prompts, fits):
            if not ok:
                bad.add(questions[i].origin(name), f"prompt longer than the LM's {tokens.max_tokens} positions "
                                                   f"with a {cfg.max_new_tokens}-token answer")
        if any(fits):
            picked = [i for i, ok in zip(prompts, fits) if ok]
            with autocast(cfg.precision):
                features = model.latents(batch["inputs"][torch.tensor(fits)].to(compute_device()))  # [b, N, h]
                texts = generate(model.head, features, [prompts[i] for i in picked], tokens.tokenizer,
                                 cfg.max_new_tokens)
            mine.update((questions[i].key, t) for i, t in zip(picked, texts))
    return {k: a for part in all_gather_objects(mine, layout) for k, a in part.items()}


def run_benchmarks(model, tokens: Tokens, questions_by_name: Dict[str, List[benchmarks.Question]], cfg, layout,
                   bad: BadSampleLog) -> dict:
    """{name: {"scores", "examples", "_questions", "_answers"}} for each benchmark's questions."""
    out = {}
    for name, questions in questions_by_name.items():
        bench = benchmarks.get(name)
        answers = answer_questions(model, tokens, name, questions, cfg, layout, bad)
        examples = [{"prompt": q.prompt, "answer": answers[q.key], "truth": q.truth}
                    for q in questions[:3] if q.key in answers]
        out[name] = {"scores": bench.score(questions, answers), "num_questions": len(questions),
                     "num_answered": len(answers), "examples": examples, "_questions": questions, "_answers": answers}
    return out


def write_submissions(output: Optional[str], results: dict) -> Dict[str, str]:
    """Each benchmark's submission files under `<output stem>.predictions/` -> {file: path}."""
    if not output:
        return {}
    folder = (output[:-len(".json")] if output.endswith(".json") else output) + ".predictions"
    written = {}
    for name, r in results.items():
        for file_name, text in benchmarks.get(name).submission(r["_questions"], r["_answers"]).items():
            path = os.path.join(folder, file_name)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w") as f:
                f.write(text)
            written[f"{name}:{file_name}"] = path
    return written


# ------------------------------------------------------------------------------------------ the run

def check_export(export: Optional[str], overwrite: bool) -> None:
    """An `--export` target the LLaVA export would refuse (an export there without `--overwrite`, or a
    folder that is not one) is an InputError before anything loads or trains."""
    if export:
        from megatron_lcl.hf.llava import check_export_target
        from megatron_lcl.hf.publish import ExportError

        try:
            check_export_target(export, overwrite)
        except ExportError as e:
            raise InputError(str(e)) from None


def check_stage(cfg: DialogueConfig, projector: Optional[str], export: Optional[str], overwrite: bool) -> None:
    """Refuse a bad combination of stage and flags, or an `export` target the export would refuse,
    before anything trains."""
    check_export(export, overwrite)
    if cfg.stage not in (1, 2):
        raise InputError(f"--stage {cfg.stage}: 1 (alignment) or 2 (instruction tuning)")
    if cfg.stage == 1 and cfg.mode == "full":
        raise InputError("--mode full: stage 1 trains the projector only (the encoder and the LM stay frozen)")
    if cfg.stage == 1 and projector:
        raise InputError("--projector: stage 1 trains a new projector (give it to stage 2)")


def run_dialogue(encoder: VisionEncoder, lm_path: str, train_source: conv.DialogueSource, cfg: DialogueConfig,
                 layout: Optional[ParallelLayout] = None, checkpoint: Optional[str] = None,
                 projector: Optional[str] = None, questions: Optional[Dict[str, list]] = None,
                 export: Optional[str] = None, output: Optional[str] = None, overwrite: bool = False) -> dict:
    """One stage on `train_source`, then each benchmark's `questions` ({name: [Question]}) answered and
    scored (submission files beside `output`); the LLaVA export (rank 0) when `export`, replacing an
    older one there only with `overwrite`."""
    layout = layout or one_process()
    check_stage(cfg, projector, export, overwrite)
    model, tokens = build_model(encoder, lm_path, cfg, projector)
    train_bad, test_bad = BadSampleLog(), BadSampleLog()
    with frozen_guard(encoder, cfg.mode) as guard:
        t0 = time.time()
        fit(model, DialogueImages(train_source, encoder.image_size),
            lambda m, b: dialogue_step(m, b, train_source, tokens, layout, train_bad), cfg, layout, train_bad,
            checkpoint, f"stage {cfg.stage}")
        by_benchmark = run_benchmarks(model, tokens, questions or {}, cfg, layout, test_bad)
    files = write_submissions(output, by_benchmark) if layout.rank == 0 else {}
    if export and layout.rank == 0:
        from megatron_lcl.hf.llava import export_llava

        export_llava(model, tokens, export, overwrite)
    return {"task": "dialogue", "stage": cfg.stage, "encoder": encoder.source, "encoder_kind": encoder.kind,
            "lm": lm_path, "template": tokens.template_name, "num_train": len(train_source),
            "scores_by_benchmark": {n: {k: v for k, v in r.items() if not k.startswith("_")}
                                    for n, r in by_benchmark.items()},
            "encoder_unchanged": guard.unchanged, "time_s": round(time.time() - t0, 1),
            "world_size": layout.dp_size, "submission_files": files, "export": export,
            "bad_samples": {"train_index": train_source.problems.as_dict(),
                            "train_read": merge_bad_logs(train_bad, layout),
                            "test_read": merge_bad_logs(test_bad, layout)},
            "config": asdict(cfg), "_model": model, "_tokens": tokens, "_answers": by_benchmark}


# ------------------------------------------------------------------------------------------ command line

HEADLINES = {"vqav2": "accuracy", "gqa": "accuracy", "pope": "f1", "scienceqa_img": "accuracy",
             "mmbench": "circular_accuracy", "mme": "Perception"}


def benchmark_specs(values: List[str]) -> Dict[str, str]:
    specs = {}
    for value in values or []:
        name, sep, path = value.partition("=")
        if not sep or not path:
            raise InputError(f"--benchmark {value}: NAME=PATH (NAME one of {', '.join(sorted(benchmarks.BENCHMARKS))})")
        benchmarks.get(name)
        if not os.path.exists(path):
            raise InputError(f"--benchmark {value}: no such file or directory")
        specs[name] = path
    return specs


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--encoder", required=True, help="megatron_lcl checkpoint or HF CLIPVisionModel folder")
    p.add_argument("--lm", required=True, help="HF AutoModelForCausalLM folder (with its tokenizer)")
    p.add_argument("--data", required=True, help="LLaVA conversation JSON (stage 1: caption pairs; stage 2: the mix)")
    p.add_argument("--image-root", help="folder the JSON's image paths are relative to (default: the JSON's)")
    p.add_argument("--projector", help="stage 2: the stage-1 --checkpoint file to start the projector from")
    p.add_argument("--benchmark", nargs="*", default=[], help="NAME=PATH, answered and scored after training")
    p.add_argument("--export", help="write a HF LlavaForConditionalGeneration folder (+ processor) here")
    p.add_argument("--overwrite", action="store_true", help="--export may replace an older LLaVA export")
    add_config_args(p, DialogueConfig, exclude=("stage",))
    p.add_argument("--stage", type=int, choices=(1, 2), default=2, help="1: alignment; 2: instruction tuning")
    common_args(p)
    stage = p.parse_known_args(argv)[0].stage
    return parse_with_preset(p, argv, PRESETS_BY_STAGE[stage])


def check_choices(args) -> None:
    if args.template not in conv.TEMPLATE_CHOICES:
        raise InputError(f"--template {args.template}: one of {', '.join(conv.TEMPLATE_CHOICES)}")
    if args.vision_feature_select_strategy not in STRATEGIES:
        raise InputError(f"--vision-feature-select-strategy {args.vision_feature_select_strategy}: one of "
                         f"{', '.join(STRATEGIES)}")


def load_data(args) -> TaskData:
    """The training conversations and every benchmark's questions (read before anything trains: a bad
    file ends the command at once)."""
    check_choices(args)
    check_export(args.export, args.overwrite)
    specs = benchmark_specs(args.benchmark)
    questions = {name: benchmarks.get(name).read(path, None) for name, path in specs.items()}
    return TaskData(conv.read_llava_json(args.data, args.image_root), questions)


def check_lm(args, data: TaskData) -> None:
    """The LM folder's tokenizer, before any weights load (`load_dialogue_lm`'s refusals)."""
    check_tokenizer(load_tokenizer(args.lm), args.lm)


def load_encoder(args) -> VisionEncoder:
    clip, source, kind = load_vision_tower(args.encoder)
    return dialogue_encoder(clip, args.vision_feature_layer, args.vision_feature_select_strategy, source, kind)


def run(args, encoder: VisionEncoder, data: TaskData, cfg: DialogueConfig, layout: ParallelLayout) -> dict:
    return run_dialogue(encoder, args.lm, data.train, cfg, layout, args.checkpoint, args.projector, data.tests,
                        args.export, args.output, args.overwrite)


def table(result: dict) -> str:
    names = list(result["scores_by_benchmark"])
    row = [result.get("name", result["encoder"]), result["mode"], f"stage {result['stage']}"]
    row += [result["scores_by_benchmark"][n]["scores"].get(HEADLINES.get(n, "accuracy")) for n in names]
    columns = [f"{n} {HEADLINES.get(n, 'accuracy')}" for n in names] or ["-"]
    return format_table(["Vision encoder", "transfer", "stage"], [("multi-modal dialogue", columns)],
                        [row if names else row + [None]])


def summary(result: dict) -> str:
    lines = [f"{result['num_train']} training conversations ({result['template']} template), {result['time_s']} s; "
             f"encoder weights unchanged: {result['encoder_unchanged']}"]
    lines += [f"submission ({name}): {path}" for name, path in result["submission_files"].items()]
    if result.get("export"):
        lines.append(f"LLaVA export (HF LlavaForConditionalGeneration + processor): {result['export']}")
    return "\n".join(lines)


COMMAND = Command(parse_args, DialogueConfig, ("encoder", "lm", "data", "image_root", "projector"), load_data, run,
                  summary, before_loading=check_lm, load_encoder=load_encoder, table=table)

run_command_line, main = entry_points(COMMAND)  # `python -m megatron_lcl.eval.dialogue`, the console script


if __name__ == "__main__":
    sys.exit(main())
