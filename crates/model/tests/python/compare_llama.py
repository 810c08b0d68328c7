"""Loads a Ferrite checkpoint folder in transformers and compares it with Ferrite's outputs.

Usage: compare_llama.py FOLDER. FOLDER holds the checkpoint and `ferrite_outputs.safetensors`
with `input_ids`, `attention_mask`, `position_ids`, `logits` (Ferrite's, f32) and optionally
`prompt` and `greedy` (Ferrite's greedy continuation). Prints one JSON line with the largest
logit difference over real (unpadded) positions and whether greedy continuations agree;
exits 1 when the difference exceeds the tolerance or the continuations differ.
"""

import json
import sys

import torch
from safetensors.torch import load_file
from transformers import LlamaForCausalLM

TOLERANCE = 1e-4


def main() -> int:
    folder = sys.argv[1]
    ferrite = load_file(f"{folder}/ferrite_outputs.safetensors")
    model = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.eval()
    report = {}
    with torch.no_grad():
        if "logits" in ferrite:
            mask = ferrite["attention_mask"]
            logits = model(
                input_ids=ferrite["input_ids"],
                attention_mask=mask,
                position_ids=ferrite["position_ids"],
            ).logits
            real = mask.bool()
            report["max_abs_logit_diff"] = (logits - ferrite["logits"]).abs()[real].max().item()
        if "greedy" in ferrite:
            prompt = ferrite["prompt"]
            expected = ferrite["greedy"].tolist()
            stop_early = bool(ferrite.get("greedy_stops_on_eos", torch.tensor([0])).item())
            generated = model.generate(
                prompt,
                attention_mask=torch.ones_like(prompt),
                max_new_tokens=len(expected),
                # Ferrite's run ignored EOS unless told otherwise; so must transformers.
                min_new_tokens=0 if stop_early else len(expected),
                do_sample=False,
            )
            hf_tokens = generated[0, prompt.shape[1]:].tolist()
            report["greedy_equal"] = hf_tokens == expected
            report["hf_greedy"] = hf_tokens
    print(json.dumps(report))
    ok = report.get("max_abs_logit_diff", 0.0) <= TOLERANCE and report.get("greedy_equal", True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
