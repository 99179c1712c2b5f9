"""The GPU benchmark end to end, inside one call of at most 10 minutes on a lent GPU (bench/gpu/run.sh).

    python -m bench.gpu.run --out DIR [--cpu-smoke] [--parts build,lora,...] [--budget-s S]

Parts, in this order, each in its own process (bench/gpu/parts.py) so that its GPU memory peak is its own and a
hang costs only its cap: build (tokenizer, data, random-init models of real shapes on the GPU), 1. lora:
tunekit LoRA bf16 on the 8B shape, then trl: TRL's SFTTrainer with the same settings, 2. qlora: the same on a
4-bit base, 3. full: full fine-tuning of the 1B shape, 5. serve: the serve engine on the 1B shape, 16 clients
against one and against plain `model.generate`. 4. Every tunekit run takes its `--dry-run` estimate before it
loads weights; the summary prints it beside the measured peak.

Each part gets min(its cap, what the budget leaves after keeping `reserve_s` for every later part), and is
asked to stop `grace_s` before that (it then reports the steps it finished). After every part, DIR holds
results.json (everything), summary.txt (the tables) and logs.txt (each part's last lines).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.gpu.plan import PARTS, Plan, cpu_smoke_plan, gpu_plan

ROOT = Path(__file__).resolve().parents[2]
H100_BF16_DENSE_TFLOPS = 989.0
NEEDS_BUILD = {"lora", "trl", "qlora", "full", "serve"}


def part_cap(plan: Plan, part: str, remaining: float, later: int) -> float:
    """Seconds `part` may run: its own cap, cut so that every later part keeps `reserve_s`."""
    return min(plan.caps_s[part], remaining - later * plan.reserve_s)


def run_part(part: str, plan_file: Path, workdir: Path, cap: float, grace: float, log: Path) -> tuple[dict, float]:
    """Start `python -m bench.gpu.parts PART`, kill its process group at `cap` seconds; (result, wall seconds)."""
    out = workdir / f"result-{part}.json"
    out.unlink(missing_ok=True)
    deadline = time.time() + max(1.0, cap - grace)
    cmd = [sys.executable, "-m", "bench.gpu.parts", part, "--plan", str(plan_file), "--workdir", str(workdir),
           "--deadline", f"{deadline:.3f}", "--out", str(out)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    began = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            proc.wait(timeout=cap)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the part and anything it started
            proc.wait()
            return {"status": "timeout", "error": f"killed at its cap of {cap:.0f} s"}, time.perf_counter() - began
    wall = time.perf_counter() - began
    if out.is_file():
        return json.loads(out.read_text()), wall
    return {"status": "failed", "error": f"exit {proc.returncode} without a result"}, wall


# --------------------------------------------------------------------------------------------------
# Derived numbers


def mfu(plan: Plan, role: str, result: dict, build: dict) -> dict:
    """Model FLOPs (6N per token: what MFU usually counts) and LoRA-adjusted (4N: no weight gradients for the
    frozen base) per processed token, with causal attention over the mean example (bench.measure), against the
    H100/H200 dense bf16 datasheet rate and the matmul rate measured on the spot."""
    from bench.measure import flops_per_token

    preset = plan.preset(role)
    speed = result.get("processed_tokens_per_s")
    if not speed:
        return {}
    mean_len = build.get(preset.name, {}).get("mean_example_tokens", preset.median_tokens)
    out = {}
    for label, method in (("model", "full"), ("lora_adjusted", "lora")):
        if label == "lora_adjusted" and result.get("method") == "full":
            continue
        tflops = flops_per_token(preset, method, mean_len) * speed / 1e12
        out[f"{label}_tflops"] = tflops
        out[f"{label}_mfu_vs_989"] = tflops / H100_BF16_DENSE_TFLOPS
        if build.get("matmul_peak_tflops"):
            out[f"{label}_mfu_vs_measured_matmul"] = tflops / build["matmul_peak_tflops"]
    return out


def estimate_rows(parts: dict) -> list[dict]:
    """Each tunekit run's dry-run estimate beside what it measured: on CUDA the tensors against
    max_memory_allocated and the total against the reserved peak plus what lies outside the allocator; on CPU
    the total against the peak RSS, plus what the GPU formula says for the same run."""
    rows = []
    for part in ("lora", "qlora", "full"):
        r = parts.get(part, {})
        est, mem = r.get("estimate_mib"), r.get("memory", {})
        if not est:
            continue
        row = {"part": part, "estimate_total_mib": est["total"], "estimate_tensors_mib": est["tensors"]}
        if "max_allocated_mib" in mem:
            row["measured_allocated_mib"] = mem["max_allocated_mib"]
            row["measured_total_mib"] = mem["max_reserved_mib"] + mem["outside_allocator_mib"]
            row["tensors_ratio"] = est["tensors"] / mem["max_allocated_mib"]
            row["total_ratio"] = est["total"] / row["measured_total_mib"]
        elif "peak_rss_mib" in mem:
            row["measured_total_mib"] = mem["peak_rss_mib"]
            row["total_ratio"] = est["total"] / mem["peak_rss_mib"]
        if "estimate_gpu_formula_mib" in r:
            row["gpu_formula_total_mib"] = r["estimate_gpu_formula_mib"]["total"]
        rows.append(row)
    return rows


def serving(result: dict) -> dict:
    one, many, gen = (result.get(k, {}) for k in ("engine_1", "engine_many", "generate"))
    if "tokens_per_s" not in one or "tokens_per_s" not in many:
        return {}
    out = {"throughput_ratio": many["tokens_per_s"] / one["tokens_per_s"], "p95_ratio": many["p95_s"] / one["p95_s"]}
    out["throughput_goal_met"] = out["throughput_ratio"] >= 3.0
    out["p95_goal_met"] = out["p95_ratio"] <= 2.0
    if "tokens_per_s" in gen:
        out["one_client_vs_generate"] = one["tokens_per_s"] / gen["tokens_per_s"]
        out["many_clients_vs_generate"] = many["tokens_per_s"] / gen["tokens_per_s"]
    return out


def derive(plan: Plan, parts: dict) -> dict:
    build = parts.get("build", {})
    derived: dict = {"mfu": {}, "estimates": estimate_rows(parts), "serving": serving(parts.get("serve", {}))}
    for part, role in (("lora", "big"), ("trl", "big"), ("qlora", "big"), ("full", "small")):
        if parts.get(part, {}).get("status") == "ok":
            derived["mfu"][part] = mfu(plan, role, parts[part], build)
    tk, trl = parts.get("lora", {}), parts.get("trl", {})
    if tk.get("tokens_per_s") and trl.get("tokens_per_s"):
        derived["tunekit_vs_trl"] = {"tokens_per_s_ratio": tk["tokens_per_s"] / trl["tokens_per_s"]}
        a, b = tk.get("memory", {}), trl.get("memory", {})
        key = "max_allocated_mib" if "max_allocated_mib" in a else "peak_rss_mib"
        if a.get(key) and b.get(key):
            derived["tunekit_vs_trl"]["memory_ratio"] = a[key] / b[key]
    return derived


# --------------------------------------------------------------------------------------------------
# Report


def summary_text(plan: Plan, parts: dict, walls: dict, derived: dict) -> str:
    lines = [f"bench/gpu ({plan.name}): {plan.big.name} and {plan.small.name}, seq {plan.big.seq_len}, "
             f"{plan.steps} steps of {plan.batch_rows} rows (first {plan.warmup} not timed)"]
    machine = parts.get("build", {}).get("machine", {})
    if machine:
        lines.append("machine: " + ", ".join(f"{k} {v}" for k, v in machine.items() if v is not None))
    lines.append("")
    lines.append(f"{'part':<7}{'status':<10}{'wall s':>7}{'steps':>6}{'trained tok/s':>14}{'processed tok/s':>16}"
                 f"{'peak MiB':>10}")
    for part in PARTS:
        r = parts.get(part)
        if r is None:
            continue
        mem = r.get("memory", {})
        peak = mem.get("max_allocated_mib", mem.get("peak_rss_mib"))
        lines.append(f"{part:<7}{r.get('status', '?'):<10}{walls.get(part, 0):>7.0f}{r.get('steps', ''):>6}"
                     f"{fmt(r.get('tokens_per_s')):>14}{fmt(r.get('processed_tokens_per_s')):>16}{fmt(peak):>10}")
        if r.get("status") != "ok":
            lines.append(f"       {r.get('error', '')}")
    if derived["mfu"]:
        lines += ["", "MFU (processed tokens x FLOPs per token / 989 TFLOP/s; model = 6N, lora-adjusted = 4N):"]
        for part, m in derived["mfu"].items():
            lines.append(f"  {part:<6}" + "  ".join(f"{k} {v:.3g}" for k, v in m.items() if "mfu" in k))
    if "tunekit_vs_trl" in derived:
        lines += ["", "tunekit vs TRL (LoRA, same settings): " + ", ".join(
            f"{k} {v:.2f}" for k, v in derived["tunekit_vs_trl"].items())]
    if derived["estimates"]:
        lines += ["", "dry-run estimate beside the measured peak (MiB):"]
        for row in derived["estimates"]:
            lines.append(f"  {row['part']:<6}" + "  ".join(
                f"{k.removesuffix('_mib')} {v:,.0f}" if k.endswith("_mib") else f"{k} {v:.2f}"
                for k, v in row.items() if k != "part"))
    s = parts.get("serve", {})
    if s.get("status") == "ok":
        lines += ["", f"serving {s.get('shape')}: {s.get('max_tokens')} tokens per request"]
        for key in ("engine_1", "engine_many", "generate"):
            v = s.get(key, {})
            if "tokens_per_s" in v:
                lines.append(f"  {key:<12}{v['requests']:>4} requests {v['tokens_per_s']:>9.1f} tok/s  p50 "
                             f"{v['p50_s'] * 1000:>8.0f} ms  p95 {v['p95_s'] * 1000:>8.0f} ms")
        d = derived["serving"]
        if d:
            lines.append(f"  {plan.clients} clients vs 1: throughput x{d['throughput_ratio']:.2f} (goal >= 3: "
                         f"{'met' if d['throughput_goal_met'] else 'NOT met'}), p95 x{d['p95_ratio']:.2f} (goal <= 2: "
                         f"{'met' if d['p95_goal_met'] else 'NOT met'})")
    return "\n".join(lines) + "\n"


def fmt(value) -> str:
    return "" if value is None else f"{value:,.0f}" if isinstance(value, (int, float)) else str(value)


def write(out: Path, record: dict, text: str) -> None:
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(record, indent=1, default=str))
    tmp.replace(out / "results.json")
    (out / "summary.txt").write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on CPU: checks the script, measures nothing")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, from {', '.join(PARTS)}")
    parser.add_argument("--budget-s", type=int, help="the whole run (default: the plan's)")
    parser.add_argument("--workdir", type=Path, help="models and data (default: a temporary folder, removed)")
    args = parser.parse_args()
    plan = cpu_smoke_plan() if args.cpu_smoke else gpu_plan()
    if args.budget_s is not None:
        plan = Plan.from_dict({**plan.to_dict(), "budget_s": args.budget_s})
    chosen = [p.strip() for p in args.parts.split(",") if p.strip()]
    if unknown := [p for p in chosen if p not in PARTS]:
        parser.error(f"unknown parts {unknown}; choose from {', '.join(PARTS)}")
    if not args.cpu_smoke:
        import torch

        if not torch.cuda.is_available():
            sys.exit(f"bench/gpu/run.sh needs a CUDA GPU, and torch {torch.__version__} sees none "
                     f"({'a CPU-only build' if torch.version.cuda is None else 'no device visible'}); "
                     "check the script on CPU with: bash bench/gpu/run.sh --cpu-smoke")
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    needs_file = args.out / "needs.json"
    record = {"plan": plan.to_dict(), "parts_asked": chosen, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
              "needs": json.loads(needs_file.read_text()) if needs_file.is_file() else None, "parts": {},
              "wall_s": {}}
    with tempfile.TemporaryDirectory(prefix="tunekit-gpu-") as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        plan_file = workdir / "plan.json"
        plan_file.write_text(json.dumps(plan.to_dict()))
        logs = args.out / "logs.txt"
        logs.write_text("")
        for i, part in enumerate(chosen):
            later = len(chosen) - i - 1
            cap = part_cap(plan, part, plan.budget_s - (time.time() - started), later)
            if part in NEEDS_BUILD and "build" in chosen and record["parts"].get("build", {}).get("status") != "ok":
                result, wall = {"status": "skipped", "error": "the build part did not finish"}, 0.0
            elif cap < 2 * plan.grace_s:
                result, wall = {"status": "skipped", "error": f"{cap:.0f} s left of the budget"}, 0.0
            else:
                print(f"[{time.time() - started:5.0f} s] {part} (cap {cap:.0f} s) ...", flush=True)
                result, wall = run_part(part, plan_file, workdir, cap, plan.grace_s, workdir / f"log-{part}.txt")
                tail = (workdir / f"log-{part}.txt").read_text(errors="replace").splitlines()[-40:]
                with open(logs, "a") as fh:
                    fh.write(f"===== {part}: {result.get('status')} in {wall:.0f} s\n" + "\n".join(tail) + "\n")
            record["parts"][part], record["wall_s"][part] = result, wall
            print(f"[{time.time() - started:5.0f} s] {part}: {result.get('status')}"
                  + (f" ({result.get('error')})" if result.get("status") != "ok" else ""), flush=True)
            record["derived"] = derive(plan, record["parts"])
            record["total_s"] = time.time() - started
            text = summary_text(plan, record["parts"], record["wall_s"], record["derived"])
            write(args.out, record, text)
    print(text, end="")
    print(f"total {time.time() - started:.0f} s; results in {args.out}")


if __name__ == "__main__":
    main()
