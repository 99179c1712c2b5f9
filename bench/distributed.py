"""Per-process peak memory of full fine-tuning under FSDP2 on 1 and 2 processes (CPU, gloo).

    python -m bench.distributed --preset cpu-medium --workdir /tmp/bench-dist [--steps 3]

The same run (the preset's random-init model and data, full fine-tuning, fp32, 2 rows of up to seq_len tokens
per optimizer step, one row per forward) is started with `tunekit train --nproc N` for N = 1 and 2. Each
process reports its peak RSS during training (summary.json: peak_rss_mb, before the final save) and the
memory estimate it printed before loading weights. The ratio N=2 / N=1 is the measure: FSDP2 shards
parameters, gradients and AdamW state, but the root group (embeddings and LM head, most of a small model)
is gathered whole while it runs, and every process holds its own runtime and activations.
Writes bench/results/distributed-PRESET.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from bench.presets import PRESETS

ROOT = Path(__file__).resolve().parents[1]


def run(nproc: int, config: Path, workdir: Path) -> dict:
    log = workdir / f"nproc{nproc}.log"
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    with open(log, "w") as fh:
        done = subprocess.run([sys.executable, "-m", "tunekit.cli", "train", str(config), "--nproc", str(nproc),
                               "output.overwrite=true"], stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"nproc {nproc} failed; see {log}")
    run_dir = workdir / "run"
    summary = json.loads((run_dir / "summary.json").read_text())
    losses = [json.loads(line)["train_loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {"nproc": nproc, "peak_rss_mib": summary["peak_rss_mb"], "estimate_mib": summary["memory_estimate_mb"],
            "losses": losses, "wall_time_s": summary["wall_time_s"]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="cpu-medium", choices=[p for p in PRESETS if PRESETS[p].device == "cpu"])
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    preset = PRESETS[args.preset]

    from bench.data import prepare
    from tunekit.config import config_from_dict

    info = prepare(preset, args.workdir)
    cfg = config_from_dict({
        "model": {"base": info["model_dir"], "dtype": preset.dtype},
        "data": {"train": info["train"], "max_len": preset.seq_len},
        "method": "full",
        "train": {"max_steps": args.steps, "batch_size": 2, "micro_batch_size": 1, "lr": preset.lr,
                  "warmup_ratio": 0.0, "threads": preset.threads, "seed": 42,
                  "distributed": {"strategy": "fsdp2"}},
        "output": {"dir": str(args.workdir / "run"), "overwrite": True},
    }, source="bench")
    config = args.workdir / "run.yaml"
    config.write_text(cfg.to_yaml())
    results = [run(n, config, args.workdir) for n in (1, 2)]
    one, two = results
    loss_rel = max(abs(a - b) / abs(b) for a, b in zip(two["losses"], one["losses"], strict=True))
    out = {"preset": preset.to_dict(), "steps": args.steps, "runs": results,
           "ratio_peak_2_over_1": max(two["peak_rss_mib"]) / one["peak_rss_mib"][0],
           "max_loss_rel_diff": loss_rel}
    (ROOT / "bench" / "results").mkdir(exist_ok=True)
    (ROOT / "bench" / "results" / f"distributed-{preset.name}.json").write_text(json.dumps(out, indent=1))
    print("| processes | peak RSS per process (MiB) | estimate per process (MiB) |\n|---|---|---|")
    for r in results:
        peaks = ", ".join(f"{p:,.0f}" for p in r["peak_rss_mib"])
        print(f"| {r['nproc']} | {peaks} | {r['estimate_mib']['total']:,.0f} |")
    print(f"\nper-process peak, 2 processes / 1: {out['ratio_peak_2_over_1']:.2f}; "
          f"largest relative loss difference over {args.steps} steps: {loss_rel:.1e}")


if __name__ == "__main__":
    main()
