"""Checks Ferrite's LoRA adapters against Python peft, both ways.

Usage: compare_peft.py FOLDER. FOLDER holds `base/` (a Ferrite model folder), `adapter/`
(a Ferrite PEFT adapter), `merged/` (the base with the adapter merged, saved by Ferrite) and
`ferrite_outputs.safetensors` with `input_ids` and `logits` (Ferrite's adapted logits, f32).

1. peft loads `adapter/` over `base/`: its logits must equal Ferrite's within 1e-5.
2. transformers loads `merged/`: its logits must equal the adapter's within 1e-5.
3. peft makes an adapter of its own (random A and B, rsLoRA, all linear layers) and saves it
   to `peft_adapter/` with its logits in `peft_outputs.safetensors`, for Ferrite to load.

Prints one JSON line of differences; exits 1 when a check fails.
"""

import json
import sys

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import LlamaForCausalLM

TOLERANCE = 1e-5


def base(folder: str) -> LlamaForCausalLM:
    return LlamaForCausalLM.from_pretrained(f"{folder}/base", dtype=torch.float32).eval()


def main() -> int:
    folder = sys.argv[1]
    ferrite = load_file(f"{folder}/ferrite_outputs.safetensors")
    ids = ferrite["input_ids"]
    report = {}
    with torch.no_grad():
        adapted = PeftModel.from_pretrained(base(folder), f"{folder}/adapter").eval()
        logits = adapted(input_ids=ids).logits
        report["peft_vs_ferrite"] = (logits - ferrite["logits"]).abs().max().item()

        merged = LlamaForCausalLM.from_pretrained(f"{folder}/merged", dtype=torch.float32).eval()
        report["merged_vs_adapter"] = (merged(input_ids=ids).logits - logits).abs().max().item()

        torch.manual_seed(0)
        config = LoraConfig(
            r=4,
            lora_alpha=8,
            lora_dropout=0.0,
            target_modules="all-linear",
            use_rslora=True,
            init_lora_weights=False,
            task_type="CAUSAL_LM",
        )
        made = get_peft_model(base(folder), config).eval()
        made.save_pretrained(f"{folder}/peft_adapter")
        save_file(
            {"input_ids": ids.contiguous(), "logits": made(input_ids=ids).logits.contiguous()},
            f"{folder}/peft_outputs.safetensors",
        )
        untouched = base(folder)(input_ids=ids).logits
        report["peft_adapter_changes_logits_by"] = (
            made(input_ids=ids).logits - untouched
        ).abs().max().item()
    print(json.dumps(report))
    ok = report["peft_vs_ferrite"] <= TOLERANCE and report["merged_vs_adapter"] <= TOLERANCE
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
