"""fp32 vs bf16 autocast (`train.mixed_precision`), same run, same data, each run in a fresh process.

    python -m bench.precision                      # quickstart data on models/tiny-chat, full and LoRA
    python -m bench.precision --steps 40 --rounds 3 --threads 2

For each method (full, LoRA) it trains `--steps` optimizer steps with fp32 and with bf16 autocast, in
alternating rounds, and prints trained tokens/s (median over steps after the first `--warmup`) and the
ratio bf16 / fp32, plus the mean train loss of the last steps of each so a precision that learns
differently shows. Only the precision differs between the paired runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def one_run(method: str, precision: str, steps: int, threads: int, out: Path) -> dict:
    """Train in this process and return the per-step metrics (called in a child process)."""
    from tunekit.config import load_config
    from tunekit.train.loop import train

    cfg = load_config(REPO / "examples" / "quickstart" / "config.yaml", [
        f"method={method}", f"train.mixed_precision={precision}", f"train.max_steps={steps}",
        f"train.threads={threads}", "train.lr=1e-3", "train.micro_batch_size=8", f"output.dir={out}",
        "data.validation=null"])
    result = train(cfg)
    return {"rows": [json.loads(line) for line in (Path(result.run_dir) / "metrics.jsonl").read_text().splitlines()]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", nargs=3, metavar=("METHOD", "PRECISION", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        method, precision, out = args.child
        print("RESULT " + json.dumps(one_run(method, precision, args.steps, args.threads, Path(out))))
        return

    speeds: dict[tuple[str, str], list[float]] = {}
    losses: dict[tuple[str, str], list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for method in ("full", "lora"):
                for precision in (("no", "bf16") if r % 2 == 0 else ("bf16", "no")):
                    out = Path(tmp) / f"{method}-{precision}-{r}"
                    proc = subprocess.run([sys.executable, "-m", "bench.precision", "--steps", str(args.steps),
                                           "--threads", str(args.threads), "--child", method, precision, str(out)],
                                          cwd=REPO, capture_output=True, text=True)
                    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
                    if proc.returncode != 0 or line is None:
                        sys.exit(f"run {method}/{precision} failed:\n{proc.stderr[-3000:]}")
                    rows = json.loads(line[len("RESULT "):])["rows"]
                    speed = statistics.median(row["tokens_per_s"] for row in rows[args.warmup:])
                    loss = statistics.mean(row["train_loss"] for row in rows[-5:])
                    speeds.setdefault((method, precision), []).append(speed)
                    losses.setdefault((method, precision), []).append(loss)
                    print(f"round {r + 1} {method:4s} {precision:4s} {speed:8.0f} trained tok/s  loss {loss:.4f}",
                          flush=True)
    print(f"\n{'method':6s} {'fp32 tok/s':>11s} {'bf16 tok/s':>11s} {'bf16/fp32':>10s} {'loss fp32':>10s} "
          f"{'loss bf16':>10s}")
    for method in ("full", "lora"):
        fp32, bf16 = statistics.median(speeds[(method, "no")]), statistics.median(speeds[(method, "bf16")])
        print(f"{method:6s} {fp32:11.0f} {bf16:11.0f} {bf16 / fp32:9.2f}x {statistics.mean(losses[(method, 'no')]):10.4f} "
              f"{statistics.mean(losses[(method, 'bf16')]):10.4f}")


if __name__ == "__main__":
    main()
