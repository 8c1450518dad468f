"""Dialogue transfer, stage 2: 2 ranks equal 1 rank (full mode: the encoder's used layers train too)
and an interrupted stage resumes exactly (frozen mode: the cached features path)."""


import pytest
import torch

from dialogue_fixtures import write_dialogue_fixtures
from eval_fixtures import assert_same_weights
from megatron_lcl.eval.dialogue import conversations as conv
from megatron_lcl.eval.dialogue import task
from megatron_lcl.eval.dialogue.model import dialogue_encoder, load_vision_tower
from megatron_lcl.eval.parallel import one_process
from multirank import run_torchrun


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("dialogue_parallel")
    write_dialogue_fixtures(root, train_images=24, eval_images=2)
    return root


def test_two_rank_stage2_equals_one_rank(root):
    import dialogue_checks

    out = run_torchrun("dialogue_checks.py", 2, root / "ddp_out")
    two = torch.load(out / "dialogue_ddp.pt", weights_only=False)
    one = dialogue_checks.stage2_weights(str(root), one_process())
    assert any(k.startswith("encoder.") for k in one) and any(k.startswith("head.lm.") for k in one)
    assert_same_weights(two, one, steps=3, lr=1e-3)


def test_interrupted_stage_resumes_exactly(root, tmp_path, monkeypatch):
    source = conv.read_llava_json(str(root / "corpus" / "stage2.json"))

    def run(checkpoint=None):
        clip, src, kind = load_vision_tower(str(root / "clip"))
        cfg = task.DialogueConfig(steps=6, batch_size=4, lr=1e-3, warmup_steps=2, num_workers=0, save_every_steps=3)
        result = task.run_dialogue(dialogue_encoder(clip, -2, "default", src, kind), str(root / "lm"), source, cfg,
                                   one_process(), checkpoint)
        return result["_model"].trainable_state()

    straight = run()
    ckpt = str(tmp_path / "s2.pt")
    real_step, calls = task.dialogue_step, []

    def dies_in_step_5(*args):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt("preempted")
        return real_step(*args)

    monkeypatch.setattr(task, "dialogue_step", dies_in_step_5)
    with pytest.raises(KeyboardInterrupt):
        run(ckpt)
    monkeypatch.setattr(task, "dialogue_step", real_step)
    assert torch.load(ckpt, weights_only=False)["step"] == 3  # the save after step 3 survived
    resumed = run(ckpt)
    assert set(resumed) == set(straight) and all(torch.equal(straight[k], resumed[k]) for k in straight)
