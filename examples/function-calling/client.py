"""Call the fine-tuned function-calling model with the official openai SDK, run its tool calls, answer.

Serve the tuned run, then run this script:

    tunekit serve runs/function-calling --port 8000
    python examples/function-calling/client.py --base-url http://127.0.0.1:8000/v1 \
        "What's the weather in Lisbon, and convert 20 USD to EUR."

The loop is the one of OpenAI's function-calling guide: send the question with `tools`; the reply's
`tool_calls` name functions and their JSON arguments; run each function (tools.py) and send its result
back as a "tool" message with the call's id; the model then answers from the results.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from openai import OpenAI

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import tools  # noqa: E402  (the example's own module, beside this file)
from make_data import SYSTEM  # noqa: E402


def ask(client: OpenAI, model: str, question: str, *, max_rounds: int = 3) -> tuple[list[dict], str]:
    """(the tool calls made, as {"name", "arguments", "result"}, and the final answer)."""
    messages: list[dict] = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
    made: list[dict] = []
    for _ in range(max_rounds):
        reply = client.chat.completions.create(model=model, messages=messages, tools=tools.TOOLS,
                                               temperature=0, max_tokens=200)
        message = reply.choices[0].message
        if not message.tool_calls:
            return made, message.content or ""
        messages.append({"role": "assistant", "content": message.content,
                         "tool_calls": [call.model_dump() for call in message.tool_calls]})
        for call in message.tool_calls:
            try:
                arguments = json.loads(call.function.arguments)
            except json.JSONDecodeError:
                arguments = None
            result = (tools.call(call.function.name, arguments) if isinstance(arguments, dict)
                      else {"error": "the arguments are not a JSON object"})
            print(f"  tool call {call.function.name}({call.function.arguments}) -> {json.dumps(result)}")
            made.append({"name": call.function.name, "arguments": arguments, "result": result})
            messages.append({"role": "tool", "tool_call_id": call.id, "content": json.dumps(result)})
    return made, "(no answer after the tool calls)"


def main(argv: list[str] | None = None) -> list[tuple[str, list[dict], str]]:
    """For each question: (question, tool calls made, final answer)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("questions", nargs="*", default=[
        "What's the weather in Lisbon?",
        "Convert 20 USD to EUR, and what's on my calendar on Friday?",
        "Hello, I'm Kim!"])
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--api-key", default="unused", help="the SDK needs some key; a server without keys takes any")
    parser.add_argument("--model", default="function-calling", help="the served name of the tuned run")
    args = parser.parse_args(argv)

    client = OpenAI(base_url=args.base_url, api_key=args.api_key, max_retries=0, timeout=120)
    out = []
    for question in args.questions:
        print(f"user: {question}")
        made, answer = ask(client, args.model, question)
        print(f"assistant: {answer}\n")
        out.append((question, made, answer))
    return out


if __name__ == "__main__":
    main()
