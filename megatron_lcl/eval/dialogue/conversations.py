"""LLaVA's conversation data and chat templates.

Reading (`read_llava_json`): a JSON list of entries `{"id", "image" (optional), "conversations":
[{"from": "human"|"gpt", "value": text}, ...]}` (LCS-558K, LLaVA-665K). The first human turn of an
entry with an image carries one `<image>` tag (LLaVA moves it to the front: "<image>\\n" + text);
an entry without `image` is text-only. A malformed entry (no `conversations`, roles that do not
alternate human/gpt, an `<image>` tag without an `image`, two tags) is an InputError naming the
file, the entry and the field; an entry whose image file is missing is left out and counted
(`DialogueSource.problems`), as missing images are elsewhere in the evaluation wing.

Templates (`CHAT_TEMPLATES`, Jinja, rendered by the tokenizer's `apply_chat_template`, and saved
with the HF export's processor so that both sides build the same text):
- `plain` (stage 1, LLaVA's "plain"): the image, then the caption and "\\n"; the human's words are
  dropped (only its image stays);
- `vicuna_v1` (stage 2, LLaVA-1.5): "<system> USER: <image>\\nQ ASSISTANT: A</s>USER: ...";
- `chat_template`: the LM tokenizer's own (what `auto` picks when the tokenizer has one).

Encoding (`encode`): the rendered conversation is cut into turns by rendering growing prefixes; the
assistant parts are the targets (loss on assistant turns only, the rest -100). Tokens come from one
call on the whole text with each `<image>` tag written `num_image_tokens` times, as HF's
`LlavaProcessor` does, so a question is tokenized at training and at answering time (and by the
exported processor) alike; the projected image features replace those tokens' embeddings (as HF's
`LlavaForConditionalGeneration` does).
"""

import json
import os
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

from megatron_lcl.eval.bad_samples import BadSampleLog
from megatron_lcl.eval.errors import InputError
from megatron_lcl.eval.sources import read_file

IMAGE_TAG = "<image>"
IGNORE = -100  # label of a position that is not learned
ROLES = {"human": "user", "gpt": "assistant"}
VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's questions.")

_TEXT = ("{%- if m['content'] is string -%}{{- m['content'] -}}{%- else -%}{%- for c in m['content'] -%}"
         "{%- if c['type'] == 'image' -%}{{- '<image>\\n' -}}{%- elif c['type'] == 'text' -%}{{- c['text'] -}}"
         "{%- endif -%}{%- endfor -%}{%- endif -%}")
CHAT_TEMPLATES = {
    # LLaVA's plain (stage 1): image, answer + "\n"; the user's words are not part of the text
    "plain": ("{%- for m in messages -%}{%- if m['role'] == 'user' -%}{%- if (m['content'] is string and '<image>' in "
              "m['content']) or (m['content'] is not string and m['content'] | selectattr('type', 'equalto', 'image') "
              "| list) -%}{{- '<image>' -}}{%- endif -%}{%- else -%}" + _TEXT +
              "{{- '\\n' -}}{%- endif -%}{%- endfor -%}"),
    # LLaVA's vicuna_v1 (conv_vicuna_v1, SeparatorStyle.TWO: sep " ", sep2 eos)
    "vicuna_v1": ("{{- '" + VICUNA_SYSTEM.replace("'", "\\'") + "' -}}{%- for m in messages -%}"
                  "{%- if m['role'] == 'user' -%}{{- (' USER: ' if loop.first else 'USER: ') -}}" + _TEXT +
                  "{%- else -%}{{- ' ASSISTANT: ' -}}" + _TEXT + "{{- eos_token -}}{%- endif -%}{%- endfor -%}"
                  "{%- if add_generation_prompt -%}{{- ' ASSISTANT:' -}}{%- endif -%}"),
}
TEMPLATE_CHOICES = ("auto", "plain", "vicuna_v1", "chat_template")


# ------------------------------------------------------------------------------------------ reading

@dataclass
class Dialogue:
    """One entry: `turns` alternate (user, text), (assistant, text), ...; the first user text starts
    with the image tag when `image` (a path) is set."""

    origin: str  # "file: [k] (id ...)", for messages
    image: Optional[str]
    turns: List[Tuple[str, str]]

    def messages(self) -> List[dict]:
        return [{"role": role, "content": text} for role, text in self.turns]


def entry_origin(path: str, k: int, entry) -> str:
    ident = entry.get("id") if isinstance(entry, dict) else None
    return f"{path}: [{k}]" + (f" (id {ident!r})" if ident is not None else "")


def parse_turns(where: str, entry: dict) -> List[Tuple[str, str]]:
    """`conversations` -> [(role, text)], checked: human first, then strictly alternating, gpt last."""
    conversations = entry.get("conversations")
    if not isinstance(conversations, list) or not conversations:
        raise InputError(f"{where}: no 'conversations' list (has keys {sorted(entry)})")
    turns = []
    for j, t in enumerate(conversations):
        if not isinstance(t, dict) or "from" not in t or "value" not in t:
            raise InputError(f"{where}: conversations[{j}]: not a {{'from', 'value'}} object")
        expected = "human" if j % 2 == 0 else "gpt"
        if t["from"] != expected:
            raise InputError(f"{where}: conversations[{j}].from is {t['from']!r} where {expected!r} must come "
                             f"(roles alternate human, gpt, human, ...)")
        turns.append((ROLES[t["from"]], str(t["value"])))
    if turns[-1][0] != "assistant":
        raise InputError(f"{where}: conversations[{len(turns) - 1}] is a human turn with no gpt answer after it")
    return turns


def place_image_tag(where: str, turns: List[Tuple[str, str]], has_image: bool) -> List[Tuple[str, str]]:
    """LLaVA's `preprocess_multimodal`: the one tag moves to the front of the first human turn."""
    tags = [(j, text.count(IMAGE_TAG)) for j, (_, text) in enumerate(turns) if IMAGE_TAG in text]
    if tags and not has_image:
        raise InputError(f"{where}: conversations[{tags[0][0]}].value has an {IMAGE_TAG} tag but the entry has no "
                         f"'image'")
    if sum(n for _, n in tags) > 1:
        raise InputError(f"{where}: conversations[{tags[-1][0]}].value: a second {IMAGE_TAG} tag (one image per "
                         f"entry)")
    if not has_image:
        return turns
    first = turns[0][1].replace(IMAGE_TAG, "").strip()
    return [("user", f"{IMAGE_TAG}\n{first}")] + turns[1:]


@dataclass
class DialogueSource:
    """LLaVA JSON entries as an evaluation-wing source: `len`, `origin(i)`, `image_bytes(i)` (None for a
    text-only entry), `dialogue(i)`, `problems` (entries left out: missing image file)."""

    dialogues: List[Dialogue]
    problems: BadSampleLog = field(default_factory=BadSampleLog)
    name: str = ""

    def __len__(self) -> int:
        return len(self.dialogues)

    def origin(self, i: int) -> str:
        return self.dialogues[i].origin

    def has_image(self, i: int) -> bool:
        return self.dialogues[i].image is not None

    def image_bytes(self, i: int):
        return read_file(self.dialogues[i].image)

    def dialogue(self, i: int) -> Dialogue:
        return self.dialogues[i]


def read_llava_json(path: str, image_root: Optional[str] = None) -> DialogueSource:
    """A LLaVA JSON file -> DialogueSource; image paths relative to `image_root` (default: the file's folder)."""
    try:
        with open(path) as f:
            entries = json.load(f)
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror or e})") from None
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: not JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(entries, list):
        raise InputError(f"{path}: not a LLaVA conversation file (a JSON list of entries)")
    root = image_root or os.path.dirname(os.path.abspath(path))
    source = DialogueSource([], name=path)
    for k, entry in enumerate(entries):
        where = entry_origin(path, k, entry)
        if not isinstance(entry, dict):
            raise InputError(f"{where}: not an object")
        image = os.path.join(root, entry["image"]) if entry.get("image") else None
        turns = place_image_tag(where, parse_turns(where, entry), image is not None)
        if image is not None and not os.path.isfile(image):
            source.problems.add(where, f"missing image file: {image}")
            continue
        source.dialogues.append(Dialogue(where, image, turns))
    if not source.dialogues:
        raise InputError(f"{path}: no usable entries ({source.problems.count} left out: "
                         f"{'; '.join(source.problems.named[:2]) or 'the file is empty'})")
    return source


# ------------------------------------------------------------------------------------------ templates

def resolve_template(name: str, tokenizer) -> str:
    """The Jinja text of template `name` (auto: the tokenizer's own chat template, else vicuna_v1)."""
    own = getattr(tokenizer, "chat_template", None)
    if name == "auto":
        return own or CHAT_TEMPLATES["vicuna_v1"]
    if name == "chat_template":
        if not own:
            raise InputError("--template chat_template: the LM's tokenizer has no chat template "
                             "(use vicuna_v1 or plain)")
        return own
    return CHAT_TEMPLATES[name]


def render(tokenizer, template: str, messages: List[dict], generation_prompt: bool) -> str:
    if not messages and not generation_prompt:
        return ""
    return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                         add_generation_prompt=generation_prompt)


def segments(tokenizer, template: str, messages: List[dict]) -> List[Tuple[str, bool]]:
    """The rendered conversation as (text, is_target) pieces: everything up to and including the
    generation prompt of a user turn is context; the assistant's reply (with its end token) a target."""
    out, done = [], ""
    for k, message in enumerate(messages):
        assistant = message["role"] == "assistant"
        upto = render(tokenizer, template, messages[:k + 1], generation_prompt=not assistant)
        if not upto.startswith(done):
            raise InputError(f"the chat template does not render turn {k} as an extension of the turns before it: "
                             f"it cannot mark the assistant's turns for the loss (use --template vicuna_v1)")
        out.append((upto[len(done):], assistant))
        done = upto
    return out


def prompt_text(tokenizer, template: str, user_text: str) -> str:
    """The text a question is asked with: its user turn and the template's generation prompt."""
    return render(tokenizer, template, [{"role": "user", "content": user_text}], generation_prompt=True)


# ------------------------------------------------------------------------------------------ tokens

def expand_image_tags(text: str, num_image_tokens: int) -> str:
    """Each `<image>` -> `num_image_tokens` tags, as HF's LlavaProcessor writes the text it tokenizes."""
    return text.replace(IMAGE_TAG, IMAGE_TAG * num_image_tokens)


def tokenize(tokenizer, text: str, image_token_id: int, num_image_tokens: int, offsets: bool = False):
    """The processor's tokenization: the whole text (image tags expanded) in one call, with the
    tokenizer's special tokens (its BOS); checked that every tag became one image token."""
    expanded = expand_image_tags(text, num_image_tokens)
    encoded = tokenizer(expanded, return_offsets_mapping=offsets)
    expected = text.count(IMAGE_TAG) * num_image_tokens
    if encoded["input_ids"].count(image_token_id) != expected:
        raise InputError(f"the LM's tokenizer does not keep {IMAGE_TAG} as one token ({expected} expected, "
                         f"{encoded['input_ids'].count(image_token_id)} found)")
    return encoded


@dataclass
class Encoded:
    input_ids: List[int]
    labels: List[int]  # IGNORE where nothing is learned
    has_image: bool


def encode(tokenizer, template: str, dialogue: Dialogue, image_token_id: int, num_image_tokens: int,
           max_tokens: int) -> Encoded:
    """A dialogue -> ids and labels (loss on assistant turns only), cut to `max_tokens`. The whole
    conversation is tokenized at once, as a prompt is at inference (so training and answering see the
    same ids); a token is a target when its characters lie inside an assistant reply. When the cut
    falls inside the image, nothing is learned (no target: the caller counts it)."""
    text, targets = "", []
    for piece, is_target in segments(tokenizer, template, dialogue.messages()):
        piece_len = len(expand_image_tags(piece, num_image_tokens))
        if is_target:
            targets.append((len(expand_image_tags(text, num_image_tokens)),
                            len(expand_image_tags(text, num_image_tokens)) + piece_len))
        text += piece
    encoded = tokenize(tokenizer, text, image_token_id, num_image_tokens, offsets=True)
    ids = encoded["input_ids"]
    labels = [t if end > start and any(a <= start and end <= b for a, b in targets) else IGNORE
              for t, (start, end) in zip(ids, encoded["offset_mapping"])]
    if len(ids) > max_tokens:
        ids, labels = ids[:max_tokens], labels[:max_tokens]
        if dialogue.image is not None and ids.count(image_token_id) != num_image_tokens:
            labels = [IGNORE] * len(labels)  # the image itself does not fit
    return Encoded(ids, labels, dialogue.image is not None)
