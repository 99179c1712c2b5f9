"""Where a training step spends its time: torch.profiler over a few steps of one bench run.

    python -m bench.profile --preset cpu-small --run tunekit|trl-default|trl-packed [--active 3]

Run `python -m bench.sft --preset ...` first (it builds the data and model in the workdir). The profiler
schedule advances at the end of each optimizer step (torch's global optimizer step hook), so it records
whole steps of each stack's own loop without touching it. Prints the operators by self time and writes the
tables to <workdir>/profile-<run>.txt.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from bench.presets import PRESETS


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="cpu-small", choices=sorted(PRESETS))
    parser.add_argument("--run", default="tunekit", choices=["tunekit", "trl-default", "trl-packed"])
    parser.add_argument("--trl-no-gc", action="store_true")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--wait", type=int, default=2, help="steps before recording")
    parser.add_argument("--active", type=int, default=3, help="steps recorded")
    parser.add_argument("--rows", type=int, default=25)
    args = parser.parse_args()
    preset = PRESETS[args.preset]
    workdir = args.workdir or Path("/tmp/tunekit-bench") / preset.name

    from torch.optim.optimizer import register_optimizer_step_post_hook
    from torch.profiler import ProfilerActivity, profile, schedule
    from transformers import AutoTokenizer

    from bench.data import read_jsonl

    rows = read_jsonl(workdir / "train.jsonl")
    steps = args.wait + 1 + args.active
    if args.run == "tunekit":
        from bench.run_tunekit import tunekit_config
        from tunekit.train.loop import train

        cfg, _ = tunekit_config(preset, workdir, AutoTokenizer.from_pretrained(workdir / "model"), rows)
        cfg.train.max_steps = steps
        cfg.output.dir = workdir / "profile-tunekit-run"

        def run() -> None:
            train(cfg)
    else:
        from bench.run_trl import build_trainer

        trainer, _ = build_trainer(preset, workdir, rows, packed=args.run == "trl-packed",
                                   gradient_checkpointing=not args.trl_no_gc,
                                   output_dir=workdir / f"profile-{args.run}")
        trainer.args.max_steps = steps

        def run() -> None:
            trainer.train()

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if preset.device == "cuda" else [])
    with profile(activities=activities, schedule=schedule(wait=args.wait, warmup=1, active=args.active),
                 record_shapes=True) as prof:
        handle = register_optimizer_step_post_hook(lambda *_: prof.step())
        run()
        handle.remove()
    sort = "self_cuda_time_total" if preset.device == "cuda" else "self_cpu_time_total"
    by_op = prof.key_averages().table(sort_by=sort, row_limit=args.rows)
    by_shape = prof.key_averages(group_by_input_shape=True).table(sort_by=sort, row_limit=args.rows)
    out = workdir / f"profile-{args.run}.txt"
    out.write_text(f"# {args.active} steps of {args.run}, preset {preset.name}\n\n{by_op}\n\n# by input shape\n\n"
                   f"{by_shape}\n")
    print(by_op)
    print(f"written {out}")


if __name__ == "__main__":
    main()
