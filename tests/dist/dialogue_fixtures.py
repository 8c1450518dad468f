"""Fixtures of the multi-modal dialogue tests (in process and under torchrun): a synthetic dialogue
corpus, a tiny random CLIP vision tower (32 px, patch 8: 16 patch features + the class token) and a
tiny random OPT whose word-level tokenizer covers the corpus, the templates and the benchmarks."""

import json
from pathlib import Path

import torch

from megatron_lcl.data import preprocess_image
from megatron_lcl.eval.benchmarks import get
from megatron_lcl.eval.dialogue.conversations import VICUNA_SYSTEM
from megatron_lcl.eval.dialogue.synthetic import TEXT_ONLY, write_dialogue_corpus

BENCHMARKS = ("vqav2", "gqa", "pope", "mmbench", "mme")


def corpus_texts(corpus: dict) -> list:
    texts = [VICUNA_SYSTEM, "USER: ASSISTANT: A. B. C. D."] + [f"{q} {a}" for q, a in TEXT_ONLY]
    for stage in ("stage1", "stage2"):
        texts += [t["value"] for e in json.load(open(corpus[stage])) for t in e["conversations"]]
    for name in BENCHMARKS:
        texts += [q.prompt for q in get(name).read(corpus[name], None)]
    return texts


def write_lm(path: Path, texts, eos: bool = True, seed: int = 0) -> Path:
    """A random OPT (2 layers, width 32, 512 positions) + a word-level tokenizer over `texts`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import OPTConfig, OPTForCausalLM, PreTrainedTokenizerFast

    words = sorted({w for t in texts for w in t.replace("<image>", " ").split()})
    vocab = {w: i for i, w in enumerate(["<pad>", "</s>", "<unk>"] + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    specials = dict(pad_token="<pad>", eos_token="</s>", bos_token="</s>") if eos else {}
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", **specials).save_pretrained(str(path))
    torch.manual_seed(seed)
    cfg = OPTConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=4,
                    max_position_embeddings=512, word_embed_proj_dim=32, pad_token_id=0, bos_token_id=1,
                    eos_token_id=1, dropout=0.0, attention_dropout=0.0)
    OPTForCausalLM(cfg).save_pretrained(str(path))
    return path


def write_clip(path: Path, seed: int = 0) -> Path:
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(seed)
    CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                                     image_size=32, patch_size=8)).save_pretrained(str(path))
    return path


def write_dialogue_fixtures(root: Path, train_images: int = 48, eval_images: int = 8) -> dict:
    corpus = write_dialogue_corpus(str(root / "corpus"), train_images=train_images, eval_images=eval_images, seed=1)
    corpus["lm"] = str(write_lm(root / "lm", corpus_texts(corpus)))
    corpus["clip"] = str(write_clip(root / "clip"))
    return corpus


def expected_row(model, tokens, question, answer, cfg) -> dict:
    """What the exported model must reproduce for `question`: ids, logits `[T, V]`, greedy answer."""
    ids = tokens.prompt(question)
    size = model.encoder.image_size
    image = question.image if isinstance(question.image, bytes) or question.image is None else \
        open(question.image, "rb").read()
    pixels = preprocess_image(image, size)[None] if image is not None else torch.zeros(1, 3, size, size)
    with torch.no_grad():
        logits = model.head.logits(model.latents(pixels), torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long))
    return {"prompt": question.prompt, "image": image, "input_ids": ids, "logits": logits[0],
            "answer": answer, "max_new_tokens": cfg.max_new_tokens}
