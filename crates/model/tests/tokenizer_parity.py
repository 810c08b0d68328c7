"""Checks that Python loads a tokenizer folder saved by Ferrite and encodes as Ferrite does.

Usage: python tokenizer_parity.py DIR

DIR holds tokenizer.json and tokenizer_config.json (Tokenizer::save) and expected.json with
Ferrite's ids: {"encode": [{"text", "ids"}], "chat_with_generation_prompt": [ids]}.
The encode cases are checked with the `tokenizers` package; the chat case with
transformers' apply_chat_template when transformers is installed. Exits non-zero on any
difference.
"""

import json
import sys
from pathlib import Path

from tokenizers import Tokenizer


def main() -> int:
    folder = Path(sys.argv[1])
    expected = json.loads((folder / "expected.json").read_text())
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    # Ferrite encodes special-token spellings inside text as plain text.
    tokenizer.encode_special_tokens = True

    failures = 0
    for case in expected["encode"]:
        ids = tokenizer.encode(case["text"]).ids
        if ids != case["ids"]:
            failures += 1
            print(f"DIFFERENT {case['text']!r}: python {ids} ferrite {case['ids']}")
        decoded = tokenizer.decode(ids, skip_special_tokens=True)
        if decoded != case["text"]:
            failures += 1
            print(f"DECODE {case['text']!r}: python gave {decoded!r}")
    total = len(expected["encode"])
    print(f"encode: {total - failures}/{total} identical")

    try:
        from transformers import AutoTokenizer
    except ImportError:
        print("chat: skipped, transformers is not installed")
    else:
        hf = AutoTokenizer.from_pretrained(str(folder))
        messages = [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
        ]
        ids = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if hasattr(ids, "keys"):
            ids = ids["input_ids"]
        if list(ids) != expected["chat_with_generation_prompt"]:
            failures += 1
            print(f"DIFFERENT chat: python {list(ids)} ferrite {expected['chat_with_generation_prompt']}")
        else:
            print("chat: identical")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
