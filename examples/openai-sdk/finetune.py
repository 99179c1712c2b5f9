"""Fine-tune through tunekit's OpenAI-compatible API with the unmodified openai SDK, then call the model.

Start a server with a data dir, then run this script (it uses the quickstart's data by default):

    tunekit serve base=models/tiny-chat --data-dir serve-data --port 8000
    python examples/openai-sdk/finetune.py --base-url http://127.0.0.1:8000/v1 --model base

The steps are OpenAI's cookbook ones: upload the files, create a job, follow its events, list its
checkpoints, chat with the fine-tuned model. `--tunekit '{"train.max_steps": 20}'` passes tunekit config
values (sent as the request's `tunekit` object through the SDK's `extra_body`).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from openai import OpenAI

HERE = Path(__file__).resolve().parent
QUICKSTART = HERE.parent / "quickstart"


def main(argv: list[str] | None = None) -> tuple[str, str]:
    """(the fine-tuned model's name, its answer)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--api-key", default="unused", help="the SDK needs some key; a server without keys takes any")
    parser.add_argument("--model", default="base", help="a model the server serves (or an earlier ft:... model)")
    parser.add_argument("--train", type=Path, default=QUICKSTART / "train.jsonl")
    parser.add_argument("--valid", type=Path, default=QUICKSTART / "valid.jsonl")
    parser.add_argument("--suffix", default="recipes")
    parser.add_argument("--epochs", default="auto", help='"auto" or a number')
    parser.add_argument("--tunekit", default="{}", help="tunekit config values as JSON, e.g. '{\"lora.r\": 8}'")
    parser.add_argument("--ask", default=None, help="the message sent to the tuned model (default: the first "
                                                    "validation example's question)")
    args = parser.parse_args(argv)

    client = OpenAI(base_url=args.base_url, api_key=args.api_key)
    train = client.files.create(file=args.train.open("rb"), purpose="fine-tune")
    valid = client.files.create(file=args.valid.open("rb"), purpose="fine-tune")
    print(f"uploaded {train.filename} as {train.id} ({train.status}), {valid.filename} as {valid.id}")

    epochs = args.epochs if args.epochs == "auto" else int(args.epochs)
    job = client.fine_tuning.jobs.create(
        model=args.model, training_file=train.id, validation_file=valid.id, suffix=args.suffix,
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": epochs}}},
        extra_body={"tunekit": json.loads(args.tunekit)})
    print(f"created {job.id} ({job.status})")

    seen: set[str] = set()
    while True:
        job = client.fine_tuning.jobs.retrieve(job.id)
        new = [e for e in client.fine_tuning.jobs.list_events(job.id, limit=50) if e.id not in seen]
        for event in reversed(new):  # the API lists newest first
            seen.add(event.id)
            print(f"  {event.message}")
        if job.status in ("succeeded", "failed", "cancelled"):
            break
        time.sleep(2)
    if job.status != "succeeded":
        raise SystemExit(f"job {job.id} {job.status}: {job.error}")
    print(f"hyperparameters: {job.hyperparameters}")
    for ckpt in client.fine_tuning.jobs.checkpoints.list(job.id):
        print(f"checkpoint step {ckpt.step_number}: {ckpt.fine_tuned_model_checkpoint} {ckpt.metrics}")

    if args.ask is None:  # the first validation example, without its answer
        first = json.loads(args.valid.read_text(encoding="utf-8").splitlines()[0])
        messages = [m for m in first["messages"] if m["role"] != "assistant"]
    else:
        messages = [{"role": "user", "content": args.ask}]
    reply = client.chat.completions.create(model=job.fine_tuned_model, messages=messages, temperature=0,
                                           max_completion_tokens=64)
    answer = reply.choices[0].message.content
    print(f"{job.fine_tuned_model} says: {answer}")
    return job.fine_tuned_model, answer


if __name__ == "__main__":
    main()
