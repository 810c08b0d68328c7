"""Checks that Python loads a tokenizer folder saved by Ferrite and encodes as Ferrite does.

Usage: python tokenizer_parity.py DIR

DIR holds tokenizer.json and tokenizer_config.json (Tokenizer::save) and expected.json with
Ferrite's ids: {"encode": [{"text", "ids"}], "chats": [{"messages", "add_generation_prompt",
"ids"}]}. The encode cases are checked with the `tokenizers` package; the chats with
transformers' apply_chat_template, which renders the saved Jinja template, when transformers
is installed. Exits non-zero on any difference.
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
        chats = expected["chats"]
        same = 0
        for chat in chats:
            ids = hf.apply_chat_template(
                chat["messages"],
                add_generation_prompt=chat["add_generation_prompt"],
                tokenize=True,
            )
            if hasattr(ids, "keys"):
                ids = ids["input_ids"]
            if list(ids) == chat["ids"]:
                same += 1
            else:
                failures += 1
                print(f"DIFFERENT chat {chat['messages']}: python {list(ids)} ferrite {chat['ids']}")
        print(f"chat: {same}/{len(chats)} identical")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
