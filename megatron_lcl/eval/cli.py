"""The evaluation commands (classify, retrieve, caption, dialogue): one skeleton, and what they show a user
around a run, in one place:

- `run_command(argv, command)`: every command's work (parse, check the paths, load the data, print
  the settings, train and score through `command.run`, print the table and write the JSON) -> the
  results dict; a `Command` holds what differs between the tasks;
- `run_cli(run, argv)`: every command's `main` (python -m, console scripts) -> exit status; bad input
  (an `InputError`) ends with one line on stderr and exit status 2, no traceback;
- `entry_points(command)`: a task module's `run_command_line` (results dict) and `main` (exit status);
- `check_paths`: a mistyped path is "no such file or directory", named with its flag;
- `parse_with_preset`: `--preset NAME` sets defaults, explicit flags win; records which fields the
  command line set (`args.explicit`) and the preset's values (`args.preset_values`);
- `add_config_args` / `config_from_args`: a task's config dataclass <-> its flags;
- `start_run`: before training, the resolved settings (and where they came from), the warm-up fitted
  to a run shorter than the preset's warm-up, and train/test overlap as a warning with counts;
- at the end (report.py): the results table, what was left out counted by reason, the predictions.
"""

import argparse
import dataclasses
import glob
import os
import sys
import typing
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Tuple

from megatron_lcl.eval.encoders import load_encoder
from megatron_lcl.eval.engine import MODES, fit_warmup_to_run
from megatron_lcl.eval.errors import EXIT_BAD_INPUT, InputError
from megatron_lcl.eval.karpathy import training_overlap
from megatron_lcl.eval.parallel import init_parallel
from megatron_lcl.eval.report import bad_samples_lines, predictions_path, results_table, write_json


def is_main_rank() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def run_cli(run: Callable, argv=None) -> int:
    """`run(argv)` -> exit status: 0, or 2 after printing `error: <message>` (one line) for bad input."""
    try:
        run(argv)
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


def start_run(args: argparse.Namespace, cfg, num_train: int, train_source=None, tests: Optional[dict] = None) -> dict:
    """Before training (rank 0 prints): the resolved settings; the warm-up fitted to the run of
    `num_train` examples (`engine.fit_warmup_to_run`: scaled when it came from the preset, refused
    when explicit); with `train_source`, each of `tests` ({name: test set}) checked for images that
    are also training images, a warning with counts.
    -> {"notes", "overlap"} for the results JSON."""
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


# ------------------------------------------------------------------------------------------ config <-> flags

def add_config_args(parser: argparse.ArgumentParser, config_cls, exclude: Iterable[str] = ()) -> None:
    """Add `--field-name` (dest `field_name`) for every field of the dataclass `config_cls`, with the
    field's type and default; `Optional[T]` fields take a T (default None), bool fields --x/--no-x.
    Skips `mode` and `precision` (added with their `choices`) and the names in `exclude`."""
    hints = typing.get_type_hints(config_cls)
    skip = {"mode", "precision", *exclude}
    for f in dataclasses.fields(config_cls):
        if f.name in skip:
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kind = hints[f.name]
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        if typing.get_origin(kind) is typing.Union and len(args) == 1:  # Optional[T]
            kind = args[0]
        flag = "--" + f.name.replace("_", "-")
        help_text = f"{config_cls.__name__}.{f.name} (default: %(default)s)"
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_text)
        else:
            parser.add_argument(flag, type=kind, default=default, help=help_text)
    parser.add_argument("--mode", choices=MODES, default="frozen", help="frozen: only the new head trains; full: "
                        "the encoder too")
    parser.add_argument("--precision", choices=("bf16", "fp32"), default="bf16", help="autocast on GPU (CPU: fp32)")


def config_from_args(config_cls, args: argparse.Namespace):
    """The dataclass `config_cls` from parsed `args`: each field whose name is an attribute of `args`
    (e.g. `mode` and those `add_config_args` added) takes that value, the others their defaults."""
    return config_cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(config_cls)
                         if hasattr(args, f.name)})


def common_args(parser: argparse.ArgumentParser) -> None:
    """The flags every command has besides its config's: where to save/resume, how to name the row, where
    to write the results."""
    parser.add_argument("--checkpoint", help="save/resume the trained heads here (e.g. OUT/probe.pt)")
    parser.add_argument("--name", help="row name in the printed table (default: the encoder path)")
    parser.add_argument("--output", help="write the results JSON here")


# ------------------------------------------------------------------------------------------ the skeleton

@dataclass
class TaskData:
    """A command's data: the training source, its test set(s) as the task's `run` takes them, and the
    test sets ({name: set}) to check for images that are also training images."""

    train: object
    tests: object
    overlap_checked: Dict[str, object] = field(default_factory=dict)


@dataclass
class Command:
    """What differs between the evaluation commands; `run_command` does the rest.

    run(args, encoder, data, cfg, layout) -> the result dict (keys starting with "_" are for callers in
    Python and stay out of the JSON; `predictions_by_set` is written beside it)."""

    parse_args: Callable[[Optional[List[str]]], argparse.Namespace]
    config_cls: type
    path_flags: Tuple[str, ...]
    load_data: Callable[[argparse.Namespace], TaskData]
    run: Callable[..., dict]
    summary: Callable[[dict], str]
    before_loading: Optional[Callable[[argparse.Namespace, TaskData], None]] = None  # checks before any weights
    result_fields: Tuple[str, ...] = ()  # more args copied into the result
    load_encoder: Optional[Callable[[argparse.Namespace], object]] = None  # default: load_encoder(args.encoder)
    table: Optional[Callable[[dict], str]] = None  # default: report.results_table([result])


def entry_points(command: Command) -> tuple:
    """A task module's `(run_command_line, main)`: `run_command_line(argv)` returns the command's
    results dict (rank 0 also prints the table and writes --output), for Python callers;
    `main(argv)`, for `python -m` and the console script, returns the exit status: 0, or 2 after one
    line naming bad input."""
    def run_command_line(argv=None) -> dict:
        return run_command(argv, command)

    def main(argv=None) -> int:
        return run_cli(run_command_line, argv)

    return run_command_line, main


def run_command(argv, command: Command) -> dict:
    """One evaluation command from its argv to the printed table and the results JSON (rank 0)."""
    args = command.parse_args(argv)
    cfg = config_from_args(command.config_cls, args)
    for flag in command.path_flags:
        check_paths("--" + flag.replace("_", "-"), getattr(args, flag))
    data = command.load_data(args)
    started = start_run(args, cfg, len(data.train), data.train if data.overlap_checked else None,
                        data.overlap_checked)
    if command.before_loading:
        command.before_loading(args, data)
    layout = init_parallel()
    encoder = command.load_encoder(args) if command.load_encoder else load_encoder(args.encoder)
    result = command.run(args, encoder, data, cfg, layout)
    for key in [k for k in result if k.startswith("_")]:
        result.pop(key)
    predictions = result.pop("predictions_by_set", None)
    if not is_main_rank():
        return result
    result.update(name=args.name or args.encoder, mode=args.mode,
                  data=" ".join(args.data) if isinstance(args.data, list) else args.data,
                  **{f: getattr(args, f) for f in command.result_fields}, **started)
    if predictions is not None:
        result["predictions_files"] = write_predictions(args.output, predictions)
    print(command.table(result) if command.table else results_table([result]))
    print(command.summary(result))
    for name, path in result.get("predictions_files", {}).items():
        print(f"predictions ({len(predictions[name])} captions of {name}): {path}")
    print("\n".join(bad_samples_lines(result["bad_samples"])))
    write_json(args.output, result)
    if predictions is not None:
        result["predictions_by_set"] = predictions
    return result


def write_predictions(output: Optional[str], predictions_by_set: Dict[str, list]) -> Dict[str, str]:
    """Each test set's predictions beside the results JSON (report.predictions_path) -> {set: file}."""
    if not output:
        return {}
    files = {name: predictions_path(output, name) for name in predictions_by_set}
    for name, path in files.items():
        write_json(path, predictions_by_set[name], indent=None)
    return files
