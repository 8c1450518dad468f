"""A checkpoint's RNG states belong to the device type that drew them: megatron-core's tracker holds CUDA
generator states (16 bytes) on a GPU and, under the CPU runtime, CPU generator states (5056 bytes). A
checkpoint records its `rng_device`; resumed on the other device type at the same layout, the ranks
keep their fresh seeds, with one line, instead of failing in the tracker's first fork. Tested on CPU
with checkpoints whose tracker states were planted with a CUDA generator's size (recorded as "cuda", and
as an older checkpoint that records no device): each resume re-seeds exactly as an older format's
checkpoint without per-rank RNG states does.
"""

import json
import shutil

import pytest
import torch

from megatron_lcl import train as pretrain_lcl
from megatron_lcl.checkpoint import state as ckpt_state
from test_training import argv, build_corpus, read_rows, without_timing

pytestmark = pytest.mark.usefixtures("restore_rendezvous_env")
CUDA_STATE_BYTES = 16  # torch.cuda.get_rng_state(): Philox seed and offset


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("rng_device_data")
    build_corpus(root)
    return root


def run(data_root, run_dir, *overrides) -> int:
    return pretrain_lcl.main(argv(data_root, run_dir, "train.train_steps=4", "model.vision.drop_path_rate=0.3",
                                  "train.drop_path_ramp_steps=0",  # drop-path draws from step 1 on
                                  "checkpoint.keep_last=5", *overrides))


def resume_from_step_2(src, dst, edit_meta) -> None:
    """A copy of run `src` as it was after step 2, its meta.json changed by `edit_meta`."""
    shutil.copytree(src, dst)
    for later in ("step_00000003", "step_00000004"):
        shutil.rmtree(dst / "checkpoints" / later, ignore_errors=True)
    (dst / "checkpoints" / "latest").write_text("step_00000002\n")
    lines = (src / "metrics.jsonl").read_text().splitlines()[:2]
    (dst / "metrics.jsonl").write_text("".join(line + "\n" for line in lines))
    meta_path = dst / "checkpoints" / "step_00000002" / "meta.json"
    meta = json.loads(meta_path.read_text())
    edit_meta(meta)
    meta_path.write_text(json.dumps(meta))


def with_cuda_sized_tracker_states(real_get_rng_state):
    def get_rng_state():
        state = real_get_rng_state()
        state["tracker"] = {name: torch.zeros(CUDA_STATE_BYTES, dtype=torch.uint8) for name in state["tracker"]}
        return state
    return get_rng_state


def test_rng_states_of_the_other_device_are_re_seeded_with_one_line(data_root, tmp_path, monkeypatch, capsys):
    plain = tmp_path / "plain"
    assert run(data_root, plain, "checkpoint.save_interval=2") == 0
    assert json.loads((plain / "checkpoints" / "step_00000002" / "meta.json").read_text())["rng_device"] == "cpu"

    planted = tmp_path / "planted"  # the same run, its checkpoints holding CUDA-sized tracker states
    monkeypatch.setattr(ckpt_state, "get_rng_state", with_cuda_sized_tracker_states(ckpt_state.get_rng_state))
    assert run(data_root, planted, "checkpoint.save_interval=2") == 0
    monkeypatch.undo()
    assert without_timing(read_rows(planted)) == without_timing(read_rows(plain))

    edits = {"recorded_cuda": lambda meta: meta.update(rng_device="cuda"),
             "recorded_nothing": lambda meta: meta.pop("rng_device"),  # an older checkpoint
             "no_rng_states": lambda meta: meta.pop("rng")}  # the older format's re-seed: the reference
    rows, logs = {}, {}
    capsys.readouterr()
    for name, edit in edits.items():
        resume_from_step_2(planted, tmp_path / name, edit)
        assert run(data_root, tmp_path / name) == 0, name
        rows[name], logs[name] = without_timing(read_rows(tmp_path / name)), capsys.readouterr().out
    ckpt = "/checkpoints/step_00000002"
    assert ckpt + " holds the RNG states of cuda generators and this run draws on cpu: RNG states re-seeded" \
        in logs["recorded_cuda"], logs["recorded_cuda"]
    assert ckpt + " holds RNG states of another device's generators (their sizes differ from this run's on " \
        "cpu): RNG states re-seeded" in logs["recorded_nothing"], logs["recorded_nothing"]
    assert sum("re-seeded" in line for line in logs["recorded_cuda"].splitlines()) == 1
    assert sum("re-seeded" in line for line in logs["recorded_nothing"].splitlines()) == 1
    assert rows["recorded_cuda"] == rows["recorded_nothing"] == rows["no_rng_states"]
    assert [r["step"] for r in rows["recorded_cuda"]] == [1, 2, 3, 4]
    # Control: restoring the saved states (the plain run's own steps 3-4) draws other drop-path masks.
    assert rows["no_rng_states"][:2] == without_timing(read_rows(plain))[:2]
    assert rows["no_rng_states"][2:] != without_timing(read_rows(plain))[2:]
