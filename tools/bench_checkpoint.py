"""Benchmark: what checkpoints cost training, with saves written at once vs in the background.

    python tools/bench_checkpoint.py                 # both parts below (CPU: ~10 min on 2 cores)
    python tools/bench_checkpoint.py --part tiny     # tiny config, 2 gloo ranks
    python tools/bench_checkpoint.py --part b16      # ViT-B/16 + OPT-125M, 1 rank

For each configuration and `checkpoint.async_save` in (false, true): the first and the later save's
time and the training stall per interval save (what the rank spends in `Trainer.save`: the whole
write at once, or planning + staging for a background save; both from the run's log lines). For the
tiny config also the time from SIGTERM (sent to a plain `torchrun` agent, default 30 s shutdown
timeout, before the first interval save) to the checkpoint being complete (`latest` written) and to
the agent's exit, on an idle machine and with another 2-process CPU job running. Prints figures; it
is not a test (the behaviour is tested in tests/test_async_checkpoint.py, test_checkpoint_faults.py,
test_preemption.py). Results measured here are in docs/training.md.
"""

import argparse
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SAVED = re.compile(r"saved checkpoint \S+ \((\d+\.\d+) s\)")
PAUSED = re.compile(r"saving step \d+ in the background \(training paused (\d+\.\d+) s\)")
COMPLETED = re.compile(r"written in the background; completing it took (\d+\.\d+) s")


def build_corpus(root: Path, image_size: int) -> dict:
    """A small synthetic MMC4 corpus, its tokenizer and prepared shards (what examples/demo.sh makes)."""
    py = sys.executable
    if not (root / "shards" / "summary.json").exists():
        subprocess.run([py, "-m", "megatron_lcl.data.synthetic", "--output", str(root / "corpus"), "--num-docs",
                        "120", "--image-size", str(image_size)], check=True, capture_output=True)
        (root / "tokenizer").mkdir(parents=True, exist_ok=True)
        subprocess.run([py, str(ROOT / "tools/train_tokenizer.py"), "--format", "mmc4", "--input", str(root / "corpus"),
                        "--output", str(root / "tokenizer/lcl"), "--vocab-size", "400"], check=True, capture_output=True)
        subprocess.run([py, str(ROOT / "tools/prepare_data.py"), "--format", "mmc4", "--input", str(root / "corpus"),
                        "--output", str(root / "shards"), "--shard-size", "30", "--no-progress"], check=True,
                       capture_output=True)
    return {"data.path": root / "shards", "data.tokenizer": root / "tokenizer/lcl.model"}


def torchrun(nproc: int, config: str, overrides: dict) -> list:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            str(ROOT / "pretrain_lcl.py"), "--config", str(ROOT / config)] + [f"{k}={v}" for k, v in overrides.items()]


def env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))


def save_figures(nproc: int, config: str, overrides: dict, background: bool) -> dict:
    overrides = dict(overrides, run_dir=f"{overrides['run_dir']}_{'async' if background else 'sync'}",
                     **{"checkpoint.async_save": str(background).lower()})
    out = subprocess.run(torchrun(nproc, config, overrides),
                         cwd=ROOT, env=env(), capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"training failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    stalls = [float(t) for t in (PAUSED if background else SAVED).findall(out.stdout)]
    return {"stalls": stalls, "final": [float(t) for t in SAVED.findall(out.stdout)][-1:],
            "completing": [float(t) for t in COMPLETED.findall(out.stdout)]}


def report_saves(name: str, nproc: int, config: str, overrides: dict, saves: int) -> None:
    print(f"\n{name}: {saves} interval saves, then one at the end (at once)")
    print(f"{'async_save':<12}{'first stall s':>14}{'later stall s (median)':>24}{'final save s':>14}"
          f"{'completing s (median)':>23}")
    for background in (False, True):
        f = save_figures(nproc, config, overrides, background)
        later = statistics.median(f["stalls"][1:]) if len(f["stalls"]) > 1 else float("nan")
        completing = statistics.median(f["completing"]) if f["completing"] else float("nan")
        print(f"{str(background).lower():<12}{f['stalls'][0]:>14.2f}{later:>24.2f}{f['final'][0]:>14.2f}"
              f"{completing:>23.2f}")


def last_step(run_dir: Path) -> int:
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    return int(re.search(r'"step": (\d+)', lines[-1]).group(1)) if lines else 0


def sigterm_figures(data: dict, busy: bool, tmp: Path) -> tuple:
    """Seconds from SIGTERM to the agent until `latest` names a checkpoint, and until the agent exits."""
    run_dir = tmp / f"sigterm_{'busy' if busy else 'idle'}"
    overrides = dict(data, run_dir=run_dir, **{"train.train_steps": 10000, "checkpoint.save_interval": 1000,
                                               "logging.console": "false"})
    # The busy job runs in sessions of its own, as another job does: Linux shares the CPU between
    # sessions (autogroup), so loops in this script's session would slow the agent, not the ranks.
    burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"], start_new_session=True)
               for _ in range(2 if busy else 0)]
    agent = subprocess.Popen(torchrun(2, "examples/configs/tiny_cpu.yaml", overrides), cwd=ROOT, env=env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while last_step(run_dir) < 5:
            assert agent.poll() is None, "the run ended before step 5"
            time.sleep(0.05)
        sent = time.perf_counter()
        agent.send_signal(signal.SIGTERM)
        latest = run_dir / "checkpoints" / "latest"
        saved = None
        while agent.poll() is None:
            if saved is None and latest.exists():
                saved = time.perf_counter() - sent
            time.sleep(0.01)
        exited = time.perf_counter() - sent
        if saved is None and latest.exists():
            saved = exited
        return saved, exited
    finally:
        for b in burners:
            b.kill()


def part_tiny(tmp: Path, repeats: int) -> None:
    data = build_corpus(tmp / "tiny_data", 48)
    overrides = dict(data, run_dir=tmp / "tiny_saves", **{"train.train_steps": 55, "checkpoint.save_interval": 10,
                                                          "checkpoint.keep_last": 2, "logging.console": "false"})
    print("\n== tiny config (examples/configs/tiny_cpu.yaml), 2 gloo ranks")
    report_saves("tiny, 2 ranks", 2, "examples/configs/tiny_cpu.yaml", overrides, 5)
    print("\nSIGTERM to a plain torchrun agent at step 5 (before the first interval save), 2 ranks:")
    print(f"{'machine':<10}{'to saved checkpoint s':>24}{'to agent exit s':>18}")
    for busy in (False, True):
        figures = [sigterm_figures(data, busy, tmp / f"r{i}") for i in range(repeats)]
        saved = statistics.median(f[0] for f in figures if f[0] is not None) if any(f[0] for f in figures) else None
        exited = statistics.median(f[1] for f in figures)
        print(f"{'busy' if busy else 'idle':<10}{saved if saved is None else round(saved, 2)!s:>24}{exited:>18.2f}"
              f"   (median of {repeats}: {[tuple(round(x, 1) for x in f if x is not None) for f in figures]})")


def part_b16(tmp: Path) -> None:
    data = build_corpus(tmp / "b16_data", 64)
    overrides = dict(data, **{"train.train_steps": 7, "checkpoint.save_interval": 2, "checkpoint.keep_last": 2,
                              "precision.params_dtype": "fp32",  # bf16 matmuls crawl on this CPU
                              "data.seq_length": 256, "data.micro_batch_size": 1, "train.global_batch_size": 1,
                              "data.num_workers": 1, "logging.console": "false", "logging.log_interval": 1})
    overrides["run_dir"] = tmp / "b16_run"
    print("\n== ViT-B/16 + OPT-125M (examples/configs/vit_b16_opt125m_mmc4.yaml, fp32, seq 256, batch 1), 1 rank")
    report_saves("B/16 + OPT-125M, 1 rank", 1, "examples/configs/vit_b16_opt125m_mmc4.yaml", overrides, 3)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=("tiny", "b16", "all"), default="all")
    parser.add_argument("--repeats", type=int, default=3, help="SIGTERM runs per machine state")
    parser.add_argument("--work-dir", default=None, help="where corpora and runs go (default: a temp dir)")
    args = parser.parse_args()
    print(time.strftime("%Y-%m-%d %H:%M %Z"), f"| {os.cpu_count()} CPUs")
    with tempfile.TemporaryDirectory(dir=args.work_dir) as tmp:
        if args.part in ("tiny", "all"):
            part_tiny(Path(tmp), args.repeats)
        if args.part in ("b16", "all"):
            part_b16(Path(tmp))


if __name__ == "__main__":
    main()
