"""Run in a fresh process: load an exported LLaVA folder with stock transformers
(`LlavaForConditionalGeneration` + `AutoProcessor`) and compare, question by question, with what the
in-process model computed (`expected.pt`): the processor's input ids, the logits (max |diff|) and
the greedy answer.

    python dialogue_export_check.py EXPORT_DIR expected.pt result.json
"""

import io
import json
import sys

import torch
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration


def main(export_dir: str, expected_path: str, out_path: str) -> None:
    model = LlavaForConditionalGeneration.from_pretrained(export_dir, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(export_dir)
    expected = torch.load(expected_path, weights_only=False)
    rows = []
    for item in expected:
        content = [{"type": "image"}, {"type": "text", "text": item["prompt"]}] if item["image"] else \
            [{"type": "text", "text": item["prompt"]}]
        text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
        image = Image.open(io.BytesIO(item["image"])).convert("RGB") if item["image"] else None
        inputs = processor(text=text, images=image, return_tensors="pt")
        with torch.no_grad():
            logits = model(**inputs).logits[0]  # [T, V]
            out = model.generate(**inputs, do_sample=False, max_new_tokens=item["max_new_tokens"])
        answer = processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
        same_ids = inputs["input_ids"][0].tolist() == item["input_ids"]
        diff = (logits - item["logits"]).abs().max().item() if same_ids else float("inf")
        rows.append({"same_input_ids": same_ids, "max_abs_logit_diff": diff, "answer": answer,
                     "expected_answer": item["answer"]})
    with open(out_path, "w") as f:
        json.dump(rows, f)


if __name__ == "__main__":
    main(*sys.argv[1:4])
