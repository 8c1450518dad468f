"""What the evaluation commands (classify, retrieve, caption) show a user around a run, in one place:

- `run_cli(main)`: the entry point; bad input (an `InputError`) ends with one line on stderr and exit
  status 2, no traceback;
- `check_paths`: a mistyped path is "no such file or directory", named with its flag;
- `parse_with_preset`: `--preset NAME` sets defaults, explicit flags win; records which fields the
  command line set (`args.explicit`) and the preset's values (`args.preset_values`);
- `start_run`: before training, the resolved settings (and where they came from), the warm-up fitted
  to a run shorter than the preset's warm-up, and train/test overlap as a warning with counts;
- `bad_samples_lines`: at the end, what was left out, counted by reason.
"""

import argparse
import dataclasses
import glob
import os
import re
import sys
from typing import Callable, List, Optional

from megatron_lcl.eval.errors import EXIT_BAD_INPUT, InputError


def is_main_rank() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def run_cli(main: Callable, argv=None) -> int:
    """`main(argv)` -> exit status: 0, or 2 after printing `error: <message>` (one line) for bad input."""
    try:
        main(argv)
    except InputError as e:
        rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
        if rank == 0 or not e.every_rank:
            where = f"rank {rank}: " if world > 1 and not e.every_rank else ""
            print(f"error: {where}{e}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT
    return 0


def check_paths(flag: str, paths) -> None:
    """Every path given to `flag` exists (a glob matches something), else an InputError naming both."""
    for path in [paths] if isinstance(paths, str) else (paths or []):
        if any(c in path for c in "*?["):
            if not glob.glob(path):
                raise InputError(f"{flag} {path}: the pattern matches no file")
        elif not os.path.exists(path):
            raise InputError(f"{flag} {path}: no such file or directory")


# ------------------------------------------------------------------------------------------ settings

def explicit_fields(parser: argparse.ArgumentParser, argv) -> set:
    """The dests the command line sets itself (parsed into a namespace pre-filled with a marker:
    argparse fills in defaults only for the attributes a namespace lacks)."""
    marker = object()
    namespace = argparse.Namespace(**{a.dest: marker for a in parser._actions if a.dest != argparse.SUPPRESS})
    parser.parse_args(argv, namespace=namespace)
    return {k for k, v in vars(namespace).items() if v is not marker}


def parse_with_preset(parser: argparse.ArgumentParser, argv, presets: dict) -> argparse.Namespace:
    """Parse `argv`; `--preset NAME` first sets the defaults in `presets[NAME]` (a {dest: value} dict,
    e.g. paper Table 8's steps/batch/lr/warm-up/weight decay), and explicit flags still win. Keys that
    start with "_" are facts about the preset, not options (`_run_steps`: its run's length in steps
    when that depends on the data, for `engine.fit_warmup_to_run`)."""
    parser.add_argument("--preset", choices=sorted(presets), help="hyper-parameter preset (e.g. paper: Table 8)")
    args, _ = parser.parse_known_args(argv)
    if args.preset:
        options = {k: v for k, v in presets[args.preset].items() if not k.startswith("_")}  # _x: facts, not flags
        unknown = set(options) - set(vars(args))
        assert not unknown, f"preset {args.preset!r} sets unknown options {sorted(unknown)}"
        parser.set_defaults(**options)
    args = parser.parse_args(argv)
    args.explicit = explicit_fields(parser, argv)
    args.preset_values = dict(presets[args.preset]) if args.preset else None
    return args


def settings_line(args: argparse.Namespace, cfg) -> str:
    """`settings: mode=frozen steps=5 batch_size=64 ... (preset paper; set by flags: batch_size, steps)`."""
    values = " ".join(f"{k}={v}" for k, v in dataclasses.asdict(cfg).items())
    flags = sorted(set(dataclasses.asdict(cfg)) & args.explicit)
    source = [f"preset {args.preset}"] if args.preset else []
    source += [f"set by flags: {', '.join(flags)}"] if flags else []
    return f"settings: {values}" + (f" ({'; '.join(source)})" if source else "")


def start_run(args: argparse.Namespace, cfg, num_train: Optional[int] = None, train_source=None,
              tests: Optional[dict] = None) -> dict:
    """Before training (rank 0 prints): the resolved settings; with `num_train` (the stream engine's
    schedule) the warm-up fitted to the run (`engine.fit_warmup_to_run`: scaled when it came from
    the preset, refused when explicit); with `train_source`, each of `tests` ({name: test set})
    checked for images that are also training images, a warning with counts.
    -> {"notes", "overlap"} for the results JSON."""
    from megatron_lcl.eval.engine import fit_warmup_to_run
    from megatron_lcl.eval.karpathy import training_overlap

    notes = []
    if num_train is not None:
        notes = [n for n in [fit_warmup_to_run(cfg, num_train, args.preset_values, args.explicit)] if n]
    overlap = {}
    if train_source is not None:
        overlap = {name: training_overlap(train_source, t) for name, t in (tests or {}).items()}
    if is_main_rank():
        print(settings_line(args, cfg), flush=True)
        for note in notes:
            print(f"note: {note}", flush=True)
        for name, o in overlap.items():
            if o["count"]:
                print(f"warning: {o['count']} of the {o['of']} test images of {name} are also training images "
                      f"(same file), e.g. {', '.join(o['named'][:2])}", flush=True)
    return {"notes": notes, "overlap": overlap}


# ------------------------------------------------------------------------------------------ at the end

def _log_line(label: str, log: dict) -> Optional[str]:
    if not log.get("count"):
        return None
    kinds = ", ".join(f"{k} {n}" for k, n in sorted(log.get("by_reason", {}).items(), key=lambda kv: (-kv[1], kv[0])))
    return f"  {label}: {log['count']} ({kinds})"


def bad_samples_lines(bad_samples: dict) -> List[str]:
    """The results' `bad_samples` ({train_index: log, test_index: {set: log}, ...}) as lines of counts
    by reason; ["bad samples: none"] when nothing was left out."""
    lines = []
    for part, value in bad_samples.items():
        label = part.replace("_", " ")
        nested = value if "count" not in value else {None: value}
        for name, log in nested.items():
            line = _log_line(f"{label} {name}" if name else label, log)
            if line:
                lines.append(line)
    if not lines:
        return ["bad samples: none"]
    return ["bad samples (left out; the first 50 are named in the results JSON):"] + lines


def predictions_path(output: str, set_name: str) -> str:
    """Beside the metrics JSON: out/cap.json + "dataset_coco.json:test" -> out/cap.predictions.dataset_coco_test.json
    (a pairs set "data/pairs.jsonl" -> out/cap.predictions.pairs.json)."""
    stem = output[:-len(".json")] if output.endswith(".json") else output
    name = re.sub(r"\.(jsonl|json|tar)(?=$|:)", "", os.path.basename(set_name.rstrip("/"))).replace(":", "_")
    slug = "".join(c if c.isalnum() or c in "-_+." else "_" for c in name).strip("_.") or "test"
    return f"{stem}.predictions.{slug}.json"
