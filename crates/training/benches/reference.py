"""PyTorch/transformers side of scripts/bench-model.sh, on the checkpoint Ferrite wrote.

train: LlamaForCausalLM in PyTorch eager with torch.optim.AdamW, same batch shape and
threads as Ferrite's run. decode: transformers' generate, greedy, with its KV cache.
Prints one JSON line like the Rust side.
"""

import argparse
import json
import resource
import time

import torch
from transformers import LlamaForCausalLM


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["train", "decode"])
    parser.add_argument("dir")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--sequence-length", type=int, default=128)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=128)
    arguments = parser.parse_args()
    torch.set_num_threads(arguments.threads)
    model = LlamaForCausalLM.from_pretrained(arguments.dir, dtype=torch.float32, attn_implementation="sdpa")

    if arguments.mode == "train":
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
        torch.manual_seed(0)
        vocab = model.config.vocab_size
        batch = torch.randint(vocab, (arguments.batch_size, arguments.sequence_length + 1))
        inputs, targets = batch[:, :-1], batch[:, 1:]

        def step() -> None:
            optimizer.zero_grad()
            logits = model(input_ids=inputs).logits
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, vocab), targets.reshape(-1))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()

        step()
        started = time.perf_counter()
        for _ in range(arguments.steps):
            step()
        seconds = time.perf_counter() - started
        tokens = arguments.steps * arguments.batch_size * arguments.sequence_length
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps({"bench": "train", "impl": "pytorch", "tokens_per_second": tokens / seconds, "peak_rss_mib": peak}))
    else:
        model.eval()
        prompt = torch.arange(1, 17).unsqueeze(0)

        def run() -> float:
            started = time.perf_counter()
            with torch.no_grad():
                out = model.generate(
                    prompt,
                    attention_mask=torch.ones_like(prompt),
                    max_new_tokens=arguments.new_tokens,
                    min_new_tokens=arguments.new_tokens,
                    do_sample=False,
                    use_cache=True,
                )
            return (out.shape[1] - prompt.shape[1]) / (time.perf_counter() - started)

        run()
        print(json.dumps({"bench": "decode", "impl": "transformers", "single_tokens_per_second": run()}))


if __name__ == "__main__":
    main()
