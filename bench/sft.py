"""tunekit vs TRL on the same model, data and LoRA settings, each run in a fresh process.

    python -m bench.sft --preset cpu-small [--runs tunekit,trl-default,trl-packed] [--trl-no-gc]

Builds the tokenizer, the synthetic chat set and the random-init model once (bench/data.py), runs each stack
in its own subprocess (bench/run_tunekit.py, bench/run_trl.py), reads back what each measured, takes each
child's peak RSS from the kernel (os.wait4), prints ratios of tunekit against every TRL run and writes
everything to bench/results/<preset>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from bench.presets import PRESETS, Preset

ROOT = Path(__file__).resolve().parents[1]
RUNS = ("tunekit", "trl-default", "trl-packed")


def child_command(run: str, preset: Preset, workdir: Path, out: Path, trl_no_gc: bool) -> list[str]:
    if run == "tunekit":
        return [sys.executable, "-m", "bench.run_tunekit", "--preset", preset.name, "--workdir", str(workdir),
                "--out", str(out)]
    variant = run.removeprefix("trl-")
    cmd = [sys.executable, "-m", "bench.run_trl", "--preset", preset.name, "--workdir", str(workdir),
           "--variant", variant, "--out", str(out)]
    return cmd + (["--no-gc"] if trl_no_gc else [])


def run_child(cmd: list[str], log_path: Path) -> dict:
    """Run one benchmark process to the end; its rusage comes from os.wait4 (this child only)."""
    env = dict(os.environ)
    # The bench package and this checkout's tunekit win over any installed copy.
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "src"), env.get("PYTHONPATH", "")])
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    load_before = os.getloadavg()
    start = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {"returncode": proc.returncode, "wall_seconds": time.perf_counter() - start,
            "child_maxrss_mib": usage.ru_maxrss / 1024, "cpu_seconds": usage.ru_utime + usage.ru_stime,
            "loadavg_before": load_before, "loadavg_after": os.getloadavg()}


def interleaved_rounds(runs: list[str], repeat: int, workdir: Path, command: Callable[[str, Path], list[str]],
                       report: Callable[[str, dict, dict], str]) -> dict[str, list[dict]]:
    """Every run once per round, the rounds one after another, so that a slow spell of a shared machine hits
    each stack alike. command(run, out) starts a child that writes its result JSON to out; report(run, result,
    proc) is the line printed for a run that succeeded. Returns each run's attempts (result + process stats)."""
    attempts: dict[str, list[dict]] = {run: [] for run in runs}
    for round_no in range(repeat):
        for run in runs:
            out = workdir / f"result-{run}.json"
            out.unlink(missing_ok=True)
            log_path = workdir / f"log-{run}-{round_no}.txt"
            print(f"running {run} (round {round_no + 1}/{repeat}) ...", flush=True)
            proc = run_child(command(run, out), log_path)
            result = json.loads(out.read_text()) if out.is_file() else {}
            attempts[run].append({**result, **proc, "log": str(log_path)})
            if proc["returncode"] != 0 or not result:
                print(f"  {run} failed (exit {proc['returncode']}); last lines of {log_path}:")
                print("\n".join(log_path.read_text().splitlines()[-15:]))
            else:
                print("  " + report(run, result, proc), flush=True)
    return attempts


def median_attempt(tries: list[dict], key: str) -> tuple[dict, list[dict]]:
    """The attempt with the median `key` among those that finished (else the last try), and those finished,
    sorted by `key`."""
    done = sorted((t for t in tries if key in t), key=lambda t: t[key])
    return (done[len(done) // 2] if done else tries[-1]), done


def machine() -> dict:
    import torch

    info = {"platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    from importlib.metadata import version

    for pkg in ("transformers", "peft", "trl", "datasets", "accelerate"):
        info[pkg] = version(pkg)
    return info


def ratios(results: dict[str, dict]) -> list[dict]:
    """tunekit against each TRL run: tokens/s ratio (>1: tunekit faster), memory ratio (<1: tunekit smaller),
    final-loss difference in % of TRL's loss."""
    tk = results.get("tunekit")
    rows = []
    if not tk or "tokens_per_s" not in tk:
        return rows
    for name, other in results.items():
        if name == "tunekit" or "tokens_per_s" not in other:
            continue
        row = {"against": name,
               "tokens_per_s_ratio": tk["tokens_per_s"] / other["tokens_per_s"],
               "peak_rss_ratio": tk["child_maxrss_mib"] / other["child_maxrss_mib"],
               "loss_diff_pct": 100 * (tk["eval_loss"] - other["eval_loss"]) / other["eval_loss"]}
        if "cuda_max_allocated_mib" in tk and "cuda_max_allocated_mib" in other:
            row["cuda_memory_ratio"] = tk["cuda_max_allocated_mib"] / other["cuda_max_allocated_mib"]
        rows.append(row)
    return rows


def table(results: dict[str, dict], rows: list[dict]) -> str:
    lines = [f"{'run':<18}{'steps':>6}{'trained tok':>12}{'tok/s':>9}{'peak RSS MiB':>14}{'eval loss':>11}"
             f"{'wall s':>8}"]
    for name, r in results.items():
        if "tokens_per_s" not in r:
            lines.append(f"{name:<18}  failed (exit {r.get('returncode')}), see {r.get('log')}")
            continue
        lines.append(f"{name:<18}{r['steps']:>6}{r['trained_tokens']:>12}{r['tokens_per_s']:>9.0f}"
                     f"{r['child_maxrss_mib']:>14.0f}{r['eval_loss']:>11.4f}{r['wall_seconds']:>8.0f}")
    if rows:
        lines.append("")
        lines.append(f"{'tunekit vs':<18}{'tok/s ratio':>12}{'memory ratio':>14}{'loss diff %':>13}")
        for row in rows:
            lines.append(f"{row['against']:<18}{row['tokens_per_s_ratio']:>12.2f}{row['peak_rss_ratio']:>14.2f}"
                         f"{row['loss_diff_pct']:>13.2f}")
    return "\n".join(lines)


def bench_arguments(doc: str, runs: list[str], workdir: str, repeat: int, repeat_help: str) -> argparse.ArgumentParser:
    """The options every stack-against-stack bench takes (bench.sft, bench.dpo, bench.grpo): preset, runs,
    workdir, results, tag and rounds."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="cpu-small", choices=sorted(PRESETS))
    parser.add_argument("--runs", default=",".join(runs), help=f"comma-separated, from {', '.join(runs)}")
    parser.add_argument("--workdir", type=Path, default=None, help=f"default: /tmp/tunekit-bench/{workdir}")
    parser.add_argument("--results", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--tag", default="", help="suffix of the result file name")
    parser.add_argument("--repeat", type=int, default=repeat, help=repeat_help)
    return parser


def main() -> None:
    parser = bench_arguments(__doc__, RUNS, "<preset>", 1, "rounds of all runs (median tokens/s is reported)")
    parser.add_argument("--trl-no-gc", action="store_true",
                        help="turn off TRL's default gradient checkpointing (tunekit's default is off)")
    args = parser.parse_args()
    preset = PRESETS[args.preset]
    runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    unknown = [r for r in runs if r not in RUNS]
    if unknown:
        parser.error(f"unknown runs {unknown}; choose from {', '.join(RUNS)}")
    if preset.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            parser.error(f"preset {preset.name} needs a CUDA GPU; on CPU use cpu-small or cpu-medium")

    workdir = args.workdir or Path("/tmp/tunekit-bench") / preset.name
    from bench.data import prepare

    print(f"preparing {preset.name} data, tokenizer and model in {workdir} ...", flush=True)
    data = prepare(preset, workdir)
    print(f"  {data['n_train']} examples, {data['tokens']} tokens, {data['trained_tokens']} trained; "
          f"length p50 {data['length_p50']}, p90 {data['length_p90']}, max {data['length_max']}", flush=True)

    # Each stack's reported run is its median by tokens/s.
    attempts = interleaved_rounds(
        runs, args.repeat, workdir, lambda run, out: child_command(run, preset, workdir, out, args.trl_no_gc),
        lambda run, result, proc: f"{result['tokens_per_s']:.0f} trained tok/s, peak RSS "
                                  f"{proc['child_maxrss_mib']:.0f} MiB, eval loss {result['eval_loss']:.4f}, "
                                  f"load avg {proc['loadavg_before'][0]:.1f}")
    results: dict[str, dict] = {}
    for run, tries in attempts.items():
        chosen, done = median_attempt(tries, "tokens_per_s")
        results[run] = {**chosen, "tokens_per_s_all_rounds": [t["tokens_per_s"] for t in done]}

    # The loss before training, scored the same way (how far training moved it).
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bench.measure import eval_loss

    base = AutoModelForCausalLM.from_pretrained(data["model_dir"], dtype=torch.bfloat16 if preset.dtype == "bf16"
                                                else torch.float32).to(preset.device)
    from bench.data import read_jsonl

    data["eval_loss_untrained"] = eval_loss(base, AutoTokenizer.from_pretrained(data["model_dir"]),
                                            read_jsonl(Path(data["eval"])), preset.device)["eval_loss"]
    del base

    rows = ratios(results)
    print()
    print(table(results, rows))
    print(f"eval loss before training: {data['eval_loss_untrained']:.4f}")
    args.results.mkdir(parents=True, exist_ok=True)
    name = preset.name + (f"-{args.tag}" if args.tag else "")
    record = {"command": " ".join(["python -m bench.sft", *sys.argv[1:]]), "preset": preset.to_dict(),
              "data": data, "machine": machine(), "trl_gradient_checkpointing": not args.trl_no_gc,
              "runs": results, "ratios": rows, "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
    path = args.results / f"{name}.json"
    path.write_text(json.dumps(record, indent=2))
    print(f"\nwritten {path}")


if __name__ == "__main__":
    main()
