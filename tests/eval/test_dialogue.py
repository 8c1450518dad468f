"""Multi-modal dialogue transfer (LLaVA-1.5 recipe) on the synthetic dialogue corpus with a tiny CLIP
and a tiny OPT: the loss is on assistant turns only; LLaVA's feature selection; stage 1 trains the
projector only and stage 2 starts from it; a model overfit on 8 conversations answers them back, and
its HF `LlavaForConditionalGeneration` export, loaded by stock transformers + AutoProcessor in a
fresh process, gives the same input ids, logits within 1e-4 and the same greedy answers; every
benchmark's submission is written; each bad input gives its one line and exit status 2, or a
counted skip."""

import hashlib
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from dialogue_fixtures import expected_row, write_dialogue_fixtures, write_lm
from megatron_lcl.eval.bad_samples import BadSampleLog
from megatron_lcl.eval.benchmarks import Question, get
from megatron_lcl.eval.dialogue import conversations as conv
from megatron_lcl.eval.dialogue import task
from megatron_lcl.eval.dialogue.model import dialogue_encoder, load_vision_tower, select_features
from megatron_lcl.eval.parallel import one_process

DIST = os.path.join(os.path.dirname(__file__), "..", "dist")


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    return write_dialogue_fixtures(tmp_path_factory.mktemp("dialogue"))


def encoder_of(fx, layer=-2, strategy="default"):
    clip, source, kind = load_vision_tower(fx["clip"])
    return dialogue_encoder(clip, layer, strategy, source, kind)


def common(fx, stage, tmp_path, steps=3):
    return ["--stage", str(stage), "--encoder", fx["clip"], "--lm", fx["lm"], "--data", fx[f"stage{stage}"],
            "--steps", str(steps), "--batch-size", "8", "--num-workers", "0", "--checkpoint",
            str(tmp_path / f"s{stage}.pt")]


# ------------------------------------------------------------------------------------------ units

def test_features_follow_llava_selection(fx):
    clip = load_vision_tower(fx["clip"])[0].eval()
    pixels = torch.randn(2, 3, 32, 32)
    hidden = clip(pixel_values=pixels, output_hidden_states=True).hidden_states  # 1 + 3 layers
    assert len(hidden) == 4
    # penultimate layer, class token dropped (LLaVA-1.5) / kept
    assert torch.equal(select_features(clip, pixels, -2, "default"), hidden[2][:, 1:])
    assert select_features(clip, pixels, -2, "default").shape == (2, 16, 32)
    assert torch.equal(select_features(clip, pixels, -1, "full"), hidden[3])
    with pytest.raises(Exception, match=r"--vision-feature-layer -5: the encoder has 3 layers \(hidden states -4..3\)"):
        encoder_of(fx, layer=-5)


def test_loss_is_on_assistant_turns_only(fx):
    model, tokens = task.build_model(encoder_of(fx), fx["lm"], task.DialogueConfig(), None)
    tok = tokens.tokenizer
    dialogue = conv.Dialogue("x", "img.jpg", [("user", "<image>\nWhat shape is on the left?"), ("assistant", "circle"),
                                              ("user", "How many red circles are there?"), ("assistant", "2")])
    encoded = conv.encode(tok, tokens.template, dialogue, tokens.image_token_id, 16, 512)
    learned = [t for t, lab in zip(encoded.input_ids, encoded.labels) if lab != conv.IGNORE]
    assert tok.convert_ids_to_tokens(learned) == ["circle", "</s>", "2", "</s>"]  # answers + their end tokens
    assert [lab for lab in encoded.labels if lab != conv.IGNORE] == learned
    assert encoded.input_ids.count(tokens.image_token_id) == 16
    text = tok.decode(encoded.input_ids)
    assert text.startswith(conv.VICUNA_SYSTEM.split()[0]) and "USER: <image>" in text.replace("<image> " * 15, "")
    # stage 1's plain template: the image, then the caption (the human's words are not in the text)
    plain = conv.encode(tok, conv.CHAT_TEMPLATES["plain"], conv.Dialogue("x", "i.jpg", [
        ("user", "<image>\nDescribe the image concisely."), ("assistant", "One red circle above a blue cross.")]),
        tokens.image_token_id, 16, 512)
    assert tok.decode(plain.input_ids[16:]) == "One red circle above a blue cross."
    assert plain.labels[:16] == [conv.IGNORE] * 16 and plain.labels[16:] == plain.input_ids[16:]


# ------------------------------------------------------------------------------------------ stages

def test_stage1_trains_the_projector_only_and_stage2_starts_from_it(fx, tmp_path, capsys):
    one = task.run_command_line(common(fx, 1, tmp_path))
    assert one["template"] == "plain" and one["encoder_unchanged"]
    saved = torch.load(tmp_path / "s1.pt", weights_only=False)
    assert saved["step"] == 3
    lm = load_file(os.path.join(fx["lm"], "model.safetensors"))
    for k, v in lm.items():  # the LM is frozen in stage 1 (its new <image> row aside)
        after = saved["model"][f"head.lm.{k}"]
        assert torch.equal(after[:v.shape[0]], v), k
    out = tmp_path / "s2.json"
    two = task.run_command_line(common(fx, 2, tmp_path) + [
        "--projector", str(tmp_path / "s1.pt"), "--output", str(out),
        "--benchmark", *[f"{n}={fx[n]}" for n in ("vqav2", "gqa", "pope", "mmbench", "mme")]])
    printed = capsys.readouterr().out
    assert "multi-modal dialogue" in printed and "mmbench circular_accuracy" in printed
    assert two["template"] == "vicuna_v1" and two["stage"] == 2
    saved2 = json.loads(out.read_text())
    assert set(saved2["scores_by_benchmark"]) == {"vqav2", "gqa", "pope", "mmbench", "mme"}
    files = saved2["submission_files"]
    assert sorted(files) == ["gqa:gqa_predictions.json", "mmbench:mmbench_predictions.tsv", "mme:mme/color.txt",
                             "mme:mme/count.txt", "mme:mme/existence.txt", "mme:mme/position.txt",
                             "pope:pope_adversarial_answers.jsonl", "pope:pope_popular_answers.jsonl",
                             "pope:pope_random_answers.jsonl", "vqav2:vqav2_answers.json"]
    assert len(json.loads(open(files["vqav2:vqav2_answers.json"]).read())) == 16  # 8 images x 2 questions
    assert all(os.path.dirname(p).startswith(str(tmp_path / "s2.predictions")) for p in files.values())


def overfit_eight(fx, tmp_path):
    entries = [e for e in json.load(open(fx["stage2"])) if "image" in e and len(e["conversations"]) == 2][:8]
    entries.append({"id": "text", "conversations": [{"from": "human", "value": "What colour is grass?"},
                                                     {"from": "gpt", "value": "green"}]})
    path = tmp_path / "eight.json"
    path.write_text(json.dumps(entries))
    source = conv.read_llava_json(str(path), os.path.dirname(fx["stage2"]))
    cfg = task.DialogueConfig(steps=150, batch_size=9, lr=3e-3, warmup_steps=10, num_workers=0)
    return source, cfg, task.run_dialogue(encoder_of(fx), fx["lm"], source, cfg, one_process(),
                                          export=str(tmp_path / "llava"))


def test_overfit_answers_back_and_the_hf_export_agrees_in_a_fresh_process(fx, tmp_path):
    source, cfg, result = overfit_eight(fx, tmp_path)
    model, tokens = result["_model"], result["_tokens"]
    assert result["encoder_unchanged"]
    questions = [Question(str(i), d.turns[0][1].replace("<image>\n", ""), open(d.image, "rb").read() if d.image else None,
                          d.turns[1][1]) for i, d in enumerate(source.dialogues)]
    questions += get("mmbench").read(fx["mmbench"], None)[:4] + get("pope").read(fx["pope"], None)[:4]
    answers = task.answer_questions(model, tokens, "check", questions, cfg, one_process(), BadSampleLog())
    assert [answers[q.key] for q in questions[:9]] == [q.truth for q in questions[:9]]  # learned, text-only too
    expected = [expected_row(model, tokens, q, answers[q.key], cfg) for q in questions]
    torch.save(expected, tmp_path / "expected.pt")
    subprocess.run([sys.executable, os.path.join(DIST, "dialogue_export_check.py"), str(tmp_path / "llava"),
                    str(tmp_path / "expected.pt"), str(tmp_path / "check.json")], check=True, timeout=600)
    rows = json.loads((tmp_path / "check.json").read_text())
    assert all(r["same_input_ids"] for r in rows)
    assert max(r["max_abs_logit_diff"] for r in rows) <= 1e-4
    assert [r["answer"] for r in rows] == [r["expected_answer"] for r in rows]


def tree_digest(folder) -> dict:
    """{relative path: sha256} of every file under `folder`."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_llava_export_is_written_whole_and_refuses_an_existing_one(fx, tmp_path, monkeypatch, capsys):
    """As the main export (tests/test_hf_export.py): the processor's save raises after the model was
    written (before: a folder with weights and no processor under the target's name): no folder is left,
    an older export stays bitwise as it was; an existing export is refused before anything trains
    unless --overwrite, and a folder that is not a LLaVA export never replaced."""
    from transformers import LlavaProcessor

    from megatron_lcl.hf import llava
    from megatron_lcl.hf.publish import ExportError

    result = task.run_dialogue(encoder_of(fx), fx["lm"], conv.read_llava_json(fx["stage2"]),
                               task.DialogueConfig(steps=1, batch_size=4, num_workers=0), one_process())
    model, tokens = result["_model"], result["_tokens"]
    written = []

    def failing_save(self, path, *args, **kwargs):
        written.extend(sorted(os.listdir(path)))
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(LlavaProcessor, "save_pretrained", failing_save)
        with pytest.raises(OSError, match="No space left"):
            llava.export_llava(model, tokens, str(tmp_path / "fresh"))
    assert "model.safetensors" in written and not (tmp_path / "fresh").exists()
    llava.export_llava(model, tokens, str(tmp_path / "old"))
    assert json.loads((tmp_path / "old" / llava.MARKER).read_text())["template"] == "vicuna_v1"
    (tmp_path / "old" / "marker.txt").write_text("the older export")
    before = tree_digest(tmp_path / "old")
    with monkeypatch.context() as patch:
        patch.setattr(LlavaProcessor, "save_pretrained", failing_save)
        with pytest.raises(OSError, match="No space left"):
            llava.export_llava(model, tokens, str(tmp_path / "old"), overwrite=True)
    assert tree_digest(tmp_path / "old") == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # the partial folders removed
    # an existing export: refused (one line, exit 2) before the stage trains (no --checkpoint written)
    argv = common(fx, 2, tmp_path, steps=1) + ["--export", str(tmp_path / "old")]
    capsys.readouterr()  # the loads' progress bars so far
    assert task.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: --export {tmp_path / 'old'} already holds an export; --overwrite replaces it "
                   "(atomically where the file system allows), or choose another folder"]
    assert not (tmp_path / "s2.pt").exists() and tree_digest(tmp_path / "old") == before
    assert task.main(argv + ["--overwrite"]) == 0
    assert "marker.txt" not in tree_digest(tmp_path / "old")  # replaced whole
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match=f"notes exists and is not a megatron_lcl export \\(no {llava.MARKER}\\)"):
        llava.export_llava(model, tokens, str(tmp_path / "notes"), overwrite=True)
    assert (tmp_path / "notes" / "keep.txt").read_text() == "mine"


# ------------------------------------------------------------------------------------------ bad input

def write_entries(tmp_path, name, entries):
    path = tmp_path / name
    path.write_text(json.dumps(entries))
    return str(path)


def test_bad_inputs_give_one_line_and_exit_2(fx, tmp_path, capsys):
    image = os.path.relpath(os.path.join(os.path.dirname(fx["stage2"]), "images", "scene_0000000.jpg"), tmp_path)
    qa = [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "red"}]
    cases = {
        "tag.json": ([{"id": "a", "conversations": qa}],
                     "[0] (id 'a'): conversations[0].value has an <image> tag but the entry has no 'image'"),
        "roles.json": ([{"id": "b", "image": image, "conversations": [qa[0], qa[0], qa[1]]}],
                       "[0] (id 'b'): conversations[1].from is 'human' where 'gpt' must come (roles alternate "
                       "human, gpt, human, ...)"),
        "last.json": ([{"id": "c", "image": image, "conversations": qa + [qa[0]]}],
                      "[0] (id 'c'): conversations[2] is a human turn with no gpt answer after it"),
    }
    for name, (entries, message) in cases.items():
        path = write_entries(tmp_path, name, entries)
        argv = ["--encoder", fx["clip"], "--lm", fx["lm"], "--data", path, "--steps", "1", "--batch-size", "1"]
        assert task.main(argv) == 2
        assert capsys.readouterr().err.strip().splitlines() == [f"error: {path}: {message}"]
    # question ids that do not match the annotations: named before anything trains
    vqa_dir = tmp_path / "vqa"
    vqa_dir.mkdir()
    questions = json.load(open(fx["vqav2"]))
    questions["questions"][3]["question_id"] = 999
    (vqa_dir / "v2_OpenEnded_mscoco_val2014_questions.json").write_text(json.dumps(questions))
    ann = os.path.join(os.path.dirname(fx["vqav2"]), "v2_mscoco_val2014_annotations.json")
    (vqa_dir / "v2_mscoco_val2014_annotations.json").write_text(open(ann).read())
    argv = ["--encoder", fx["clip"], "--lm", fx["lm"], "--data", fx["stage2"], "--steps", "1", "--benchmark",
            f"vqav2={vqa_dir / 'v2_OpenEnded_mscoco_val2014_questions.json'}"]
    assert task.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {vqa_dir / 'v2_OpenEnded_mscoco_val2014_questions.json'}: questions[3].question_id 999 has "
                   f"no annotation in {vqa_dir / 'v2_mscoco_val2014_annotations.json'} (1 of 16 questions lack one)"]
    # an LM whose tokenizer has no EOS (nor pad): refused before any weights load
    bare = write_lm(tmp_path / "lm_no_eos", ["a b"], eos=False)
    assert task.main(["--encoder", fx["clip"], "--lm", str(bare), "--data", fx["stage2"], "--steps", "1"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: --lm {bare}: the tokenizer has no EOS token (eos_token None, pad_token None): it ends every "
        f"assistant turn and stops generation")


def test_missing_image_file_is_a_counted_skip(fx, tmp_path):
    entries = json.load(open(fx["stage2"]))[:8]
    entries[2] = dict(entries[2], image="images/nowhere.jpg") if "image" in entries[2] else entries[2]
    path = write_entries(tmp_path, "eight.json", entries)
    source = conv.read_llava_json(path, os.path.dirname(fx["stage2"]))
    assert len(source) == 7 and source.problems.count == 1
    assert source.problems.named == [f"{path}: [2] (id '{entries[2]['id']}'): missing image file: "
                                     f"{os.path.join(os.path.dirname(fx['stage2']), 'images', 'nowhere.jpg')}"]
    result = task.run_dialogue(encoder_of(fx), fx["lm"], source, task.DialogueConfig(steps=1, batch_size=7,
                                                                                     num_workers=0), one_process())
    assert result["bad_samples"]["train_index"]["by_reason"] == {"missing image file": 1}
    # benchmark questions: an unreadable image and a prompt too long for the LM's 512 positions are counted
    questions = [Question("fine", "What colour is grass?", None), Question("gone", "What?", str(tmp_path / "no.jpg")),
                 Question("long", "What? " * 600, None)]
    bad = BadSampleLog()
    answers = task.answer_questions(result["_model"], result["_tokens"], "probe", questions, task.DialogueConfig(
        num_workers=0), one_process(), bad)
    assert list(answers) == ["fine"] and bad.count == 2
    assert bad.by_reason == {"cannot read": 1, "prompt longer than the LM's 512 positions with a 16-token answer": 1}
