"""Drives a running Ferrite gateway with the official `openai` package, as an application would.

Usage: openai_client_check.py BASE_URL API_KEY MODEL [--expect WORD]

Checks chat and text completions, streaming (with usage), several choices, and that refusals
arrive as the package's typed errors with OpenAI's codes, after which the gateway still serves.
With --expect, the greedy answer to "What is the capital of France?" must contain WORD.
Exits non-zero with a message on the first failed check.
"""

import argparse
import math
import sys

import openai


def check(condition, message):
    if not condition:
        print(f"FAILED: {message}", file=sys.stderr)
        sys.exit(1)


def reassemble(stream, chat):
    """Texts per choice, finish reasons per choice, and the usage chunks of a stream."""
    texts, reasons, usages = {}, {}, []
    for chunk in stream:
        if chunk.usage is not None:
            usages.append(chunk)
        for choice in chunk.choices:
            piece = (choice.delta.content or "") if chat else choice.text
            check("\ufffd" not in piece, f"a chunk split a character: {piece!r}")
            texts[choice.index] = texts.get(choice.index, "") + piece
            reasons.setdefault(choice.index, []).append(choice.finish_reason)
    return texts, reasons, usages


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("base_url")
    parser.add_argument("api_key")
    parser.add_argument("model")
    parser.add_argument("--expect")
    args = parser.parse_args()
    client = openai.OpenAI(base_url=args.base_url, api_key=args.api_key, max_retries=0)

    models = [model.id for model in client.models.list()]
    check(args.model in models, f"{args.model} is not in /v1/models: {models}")

    question = [{"role": "user", "content": "What is the capital of France?"}]
    chat = client.chat.completions.create(
        model=args.model, messages=question, max_tokens=24, temperature=0, user="ci"
    )
    answer = chat.choices[0].message.content
    print(f"chat answer: {answer!r}")
    check(chat.choices[0].message.role == "assistant", "the reply is the assistant's")
    check(chat.choices[0].finish_reason in ("stop", "length"), "a finish reason")
    check(chat.usage.total_tokens == chat.usage.prompt_tokens + chat.usage.completion_tokens,
          "usage adds up")
    if args.expect:
        check(args.expect in answer, f"{args.expect!r} not in {answer!r}")

    stream = client.chat.completions.create(
        model=args.model, messages=question, max_tokens=24, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )
    texts, reasons, usages = reassemble(stream, chat=True)
    check(texts.get(0) == answer, f"streamed {texts.get(0)!r} != whole {answer!r}")
    check(all(r is None for r in reasons[0][:-1]) and reasons[0][-1] is not None,
          f"finish_reason only on the last chunk: {reasons[0]}")
    check(len(usages) == 1 and usages[0].choices == [], "one usage chunk without choices")
    check(usages[0].usage == chat.usage, f"{usages[0].usage} != {chat.usage}")

    completion = client.completions.create(
        model=args.model, prompt="The capital of France is", max_tokens=8, temperature=0,
        logprobs=2,
    )
    text = completion.choices[0].text
    print(f"completion: {text!r}")
    logprobs = completion.choices[0].logprobs.token_logprobs
    check(all(math.isfinite(lp) and lp <= 0 for lp in logprobs), f"logprobs {logprobs}")

    several = dict(model=args.model, prompt="Once upon a time", max_tokens=10,
                   temperature=1.0, seed=5, n=3)
    whole = client.completions.create(**several)
    texts, _, _ = reassemble(client.completions.create(stream=True, **several), chat=False)
    check([texts[i] for i in range(3)] == [c.text for c in whole.choices],
          "n=3 streamed reassembles to n=3 whole")

    try:
        client.chat.completions.create(model="no-such-model", messages=question)
        check(False, "an unknown model is refused")
    except openai.NotFoundError as error:
        check(error.code == "model_not_found", f"code {error.code}")
    for bad in (0, -1):
        try:
            client.completions.create(model=args.model, prompt="x", max_tokens=bad)
            check(False, f"max_tokens={bad} is refused")
        except openai.BadRequestError as error:
            check(error.param == "max_tokens", f"param {error.param}")
    try:
        client.chat.completions.create(model=args.model, messages=[], stream=True)
        check(False, "empty messages are refused")
    except openai.BadRequestError as error:
        check(error.param == "messages", f"param {error.param}")

    again = client.completions.create(model=args.model, prompt="Hello", max_tokens=2)
    check(len(again.choices) == 1, "the gateway still serves after the refusals")
    print("openai client checks passed")


if __name__ == "__main__":
    main()
