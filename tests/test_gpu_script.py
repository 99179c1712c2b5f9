"""bench/gpu/run.sh, the script one lent GPU machine runs end to end (docs/gpu.md), run here on CPU with its
tiny plan (`--cpu-smoke`): every part, the results it leaves in $OUT, its time caps and deadlines, and which
wheels it would install."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import pytest
import torch
from conftest import REPO
from packaging.requirements import Requirement

sys.path.insert(0, str(REPO))  # the bench package, as run.sh puts it on the path

from bench.gpu import needs  # noqa: E402
from bench.gpu.plan import PARTS, cpu_smoke_plan, gpu_plan  # noqa: E402

# This venv's python; no carried wheels (a checkout's .whl/ holds Python 3.12 ones for the GPU machine).
ENV = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": "", "WHEELS": "/nonexistent"}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """One whole `bash bench/gpu/run.sh --cpu-smoke` (about 45 s of CPU), its models kept for the tests below."""
    out, work = tmp_path_factory.mktemp("out"), tmp_path_factory.mktemp("work")
    began = time.perf_counter()
    done = subprocess.run(["bash", "bench/gpu/run.sh", "--cpu-smoke", "--workdir", str(work)], cwd=REPO,
                          env={**ENV, "OUT": str(out)}, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return {"out": out, "work": work, "stdout": done.stdout, "seconds": time.perf_counter() - began,
            "results": json.loads((out / "results.json").read_text())}


def test_cpu_smoke_runs_every_part_and_reports(smoke):
    plan, results = cpu_smoke_plan(), smoke["results"]
    parts = results["parts"]
    assert list(parts) == list(PARTS)
    trl_installed = all(__import__("importlib").util.find_spec(m) for m in ("trl", "datasets"))
    assert parts["trl"]["status"] == ("ok" if trl_installed else "missing"), parts["trl"]
    assert all(parts[p]["status"] == "ok" for p in PARTS if p != "trl"), {p: parts[p].get("error") for p in PARTS}
    assert parts["build"][plan.big.name]["examples"] == plan.big.n_train
    for part in ("lora", "qlora", "full") + (("trl",) if trl_installed else ()):
        r = parts[part]
        assert r["steps"] == plan.steps and r["measured_steps"] == plan.steps - plan.warmup, part
        assert r["tokens_per_s"] > 0 and r["processed_tokens_per_s"] > r["tokens_per_s"], part
        assert r["stopped_at_deadline"] is False and r["memory"]["peak_rss_mib"] > 100, part
        assert len(r["step_losses"]) == plan.steps and all(3 < x < 10 for x in r["step_losses"]), part
    # 4: every tunekit run's dry-run estimate beside its measured peak, and the GPU formula for the same run
    rows = {row["part"]: row for row in results["derived"]["estimates"]}
    assert set(rows) == {"lora", "qlora", "full"}
    for row in rows.values():
        assert 0.5 < row["total_ratio"] < 2 and row["gpu_formula_total_mib"] > 600  # context + tensors
    assert parts["full"]["estimate_mib"]["optimizer"] > parts["lora"]["estimate_mib"]["optimizer"]
    # 5: serving
    serve = parts["serve"]
    for phase, requests in (("engine_1", plan.requests_one), ("engine_many", plan.requests_many),
                            ("generate", plan.requests_one)):
        assert serve[phase]["requests"] == requests and serve[phase]["tokens"] > 0, phase
    derived = results["derived"]["serving"]
    assert derived["throughput_ratio"] == pytest.approx(serve["engine_many"]["tokens_per_s"]
                                                        / serve["engine_1"]["tokens_per_s"])
    assert {"p95_ratio", "throughput_goal_met", "p95_goal_met", "one_client_vs_generate"} <= set(derived)
    assert set(results["derived"]["mfu"]) == {"lora", "qlora", "full"} | ({"trl"} if trl_installed else set())
    assert results["total_s"] < plan.budget_s


def test_out_holds_what_a_device_call_returns(smoke):
    """$OUT: at most 8 files, named in letters, digits, '.', '_' and '-', no folders (what comes back from a
    lent machine), with the summary's tables and each part's log."""
    files = sorted(p.name for p in smoke["out"].iterdir())
    assert files == ["logs.txt", "needs.json", "results.json", "summary.txt"]
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", f) for f in files)
    summary = (smoke["out"] / "summary.txt").read_text()
    for line in ("dry-run estimate beside the measured peak", "16 clients vs 1: throughput", "MFU", "lora   ok"):
        assert line in summary, line
    assert summary in smoke["stdout"]  # printed last, too
    logs = (smoke["out"] / "logs.txt").read_text()
    assert all(f"===== {p}:" in logs for p in PARTS)
    assert "memory per process (estimate)" in logs  # the dry run's own line


def direct_imports() -> set[str]:
    """Top-level packages that tunekit's and bench's own code imports (anywhere, by AST)."""
    import ast

    tops = set()
    for path in [*(REPO / "src" / "tunekit").rglob("*.py"), *(REPO / "bench").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                tops |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                tops.add(node.module.split(".")[0])
    return tops


def test_every_package_the_parts_import_is_on_the_gpu_machine_or_carried(smoke):
    """What tunekit's and bench's code imports in the smoke run is in the GPU machine's image or carried; what
    those packages need in turn is `needs.select`'s part (their Requires-Dist, test below)."""
    from importlib.metadata import packages_distributions

    owners = packages_distributions()
    ran = {top for r in smoke["results"]["parts"].values() for top in r["imported"]} & direct_imports()
    dists = {needs.canonicalize_name(d) for top in ran for d in owners.get(top, [])}
    assert {"torch", "transformers", "peft", "pydantic", "bitsandbytes"} <= dists
    carried = {needs.canonicalize_name(n) for n in needs.CARRIED}
    optional = {"wandb"}  # TRL imports it when it is installed (here: the trackers extra); report_to is "none"
    assert sorted(dists - needs.DEVICE_IMAGE - carried - optional) == []


def test_the_needs_report_of_this_machine(smoke):
    """Here everything is installed at the lock's versions: nothing is installed from wheels, nothing unmet
    but what the bench extra would bring."""
    report = json.loads((smoke["out"] / "needs.json").read_text())
    assert report["install"] == [] and "installing" not in smoke["stdout"]
    assert report["installed"]["torch"] and report["installed"]["pydantic"]
    assert not {"pydantic", "transformers", "peft", "bitsandbytes"} & set(report["install_names"])


def test_a_training_part_stops_at_its_deadline(smoke):
    """Past its deadline a tunekit run stops after the step in progress (tunekit's STOP file), keeps its
    checkpoint and reports the steps it made."""
    from bench.gpu.parts import tunekit_run

    result = tunekit_run(cpu_smoke_plan(), "big", "lora", smoke["work"], deadline=time.time() - 1)
    assert result["stopped_at_deadline"] is True and result["steps"] == 1
    assert "throughput_error" in result and result["estimate_mib"]["total"] > 0
    assert list((smoke["work"] / "run-lora" / "checkpoints").iterdir())


def test_a_part_past_its_cap_is_killed_and_later_parts_are_skipped(tmp_path):
    from bench.gpu.run import run_part

    plan_file = tmp_path / "plan.json"
    plan_file.write_text(json.dumps(cpu_smoke_plan().to_dict()))
    began = time.perf_counter()
    result, wall = run_part("build", plan_file, tmp_path, cap=2, grace=1, log=tmp_path / "log.txt")
    assert result["status"] == "timeout" and wall < 10 and time.perf_counter() - began < 10
    # A budget too small for anything: every part skipped, the results still written.
    done = subprocess.run([sys.executable, "-m", "bench.gpu.run", "--cpu-smoke", "--budget-s", "5", "--parts",
                           "build,serve", "--out", str(tmp_path / "out")], cwd=REPO, env=ENV, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    parts = json.loads((tmp_path / "out" / "results.json").read_text())["parts"]
    assert [parts[p]["status"] for p in ("build", "serve")] == ["skipped", "skipped"]


def test_part_caps_fit_the_budget():
    plan = gpu_plan()
    assert plan.budget_s + 40 < 9 * 60  # the wheel install before it included
    remaining, spent = plan.budget_s, 0
    for i, part in enumerate(PARTS):  # every part running to its cap still ends inside the budget
        from bench.gpu.run import part_cap

        cap = part_cap(plan, part, remaining, len(PARTS) - i - 1)
        assert cap >= plan.reserve_s, part
        spent += cap
        remaining -= cap
    assert spent <= plan.budget_s


def test_the_gpu_run_is_refused_without_cuda(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    done = subprocess.run(["bash", "bench/gpu/run.sh"], cwd=REPO, env={**ENV, "OUT": str(tmp_path)},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "needs a CUDA GPU" in done.stderr and "--cpu-smoke" in done.stderr
    assert not (tmp_path / "results.json").exists()


def test_wheels_are_selected_for_what_the_gpu_machine_lacks():
    """The GPU machine's image as KINDS.md describes it: transformers 5.17 (tunekit needs >= 5.20), no pydantic,
    trl or bitsandbytes, an older typing_extensions and pyarrow."""
    carried = {needs.canonicalize_name(p.split("==")[0]): p.split("==")[1] for p in needs.pins()}
    # The image's packages at the lock's versions, but for those KINDS.md (or this test) gives otherwise.
    installed = {name: version for name, version in needs.lock_versions().items() if name in needs.DEVICE_IMAGE}
    installed.update({"transformers": "5.17.0", "peft": "0.21.2", "typing-extensions": "4.12.2", "pyarrow": "21.0.0",
                      "huggingface-hub": "1.33.0", "tokenizers": "0.23.2", "torch": "2.11.0", "accelerate": "1.15.0",
                      "fsspec": "2025.3.0", "regex": "2026.11.19"})
    requirements = needs.tunekit_requirements() + [Requirement(r) for r in (
        "typing-extensions>=4.16.0", "pydantic-core==2.50.5", "pyarrow>=24.0.0", "fsspec<=2026.9.0,>=2023.1.0",
        "huggingface-hub<3.0,>=1.31.0", "regex>=2025.10.22", "pytest>=8; extra == 'test'")]
    install, unmet = needs.select(carried, installed, requirements)
    assert set(install) == {"transformers", "pydantic", "pydantic-core", "typing-extensions", "trl", "datasets",
                            "bitsandbytes"}  # not peft, fsspec or regex: the machine's own versions do
    assert unmet == ["pyarrow>=24.0.0 (here: 21.0.0)"]  # no wheel for it: reported, so the TRL part's failure says why
    assert "torch" not in install


def test_wheels_script_pins_the_lock():
    pins = needs.pins()
    lock = needs.lock_versions()
    assert len(pins) == len(needs.CARRIED)
    assert all(lock[needs.canonicalize_name(p.split("==")[0])] == p.split("==")[1] for p in pins)
    assert "torch" not in {needs.canonicalize_name(p.split("==")[0]) for p in pins}


def test_the_gpu_report_from_gpu_shaped_results():
    """What run.py derives and prints from a GPU run's results (CUDA memory peaks, the measured matmul rate),
    fed numbers of the shape the parts report there."""
    from bench.gpu.run import derive, summary_text
    from bench.measure import flops_per_token

    plan = gpu_plan()
    cuda = {"max_allocated_mib": 36_000.0, "max_reserved_mib": 38_000.0, "outside_allocator_mib": 550.0,
            "peak_rss_mib": 9_000.0}
    parts = {
        "build": {"status": "ok", "matmul_peak_tflops": 800.0, plan.big.name: {"mean_example_tokens": 640.0}},
        "lora": {"status": "ok", "method": "lora", "steps": 12, "tokens_per_s": 5_000.0,
                 "processed_tokens_per_s": 8_000.0, "estimate_mib": {"total": 42_395.0, "tensors": 37_996.0},
                 "memory": cuda},
        "trl": {"status": "ok", "method": "lora", "steps": 12, "tokens_per_s": 4_000.0,
                "processed_tokens_per_s": 7_000.0, "memory": {**cuda, "max_allocated_mib": 30_000.0}},
        "qlora": {"status": "timeout", "error": "killed at its cap of 110 s"},
        "serve": {"status": "ok", "shape": plan.small.name, "max_tokens": 48,
                  "engine_1": {"requests": 16, "tokens_per_s": 50.0, "p50_s": 1.0, "p95_s": 1.1},
                  "engine_many": {"requests": 32, "tokens_per_s": 400.0, "p50_s": 1.5, "p95_s": 2.5},
                  "generate": {"requests": 16, "tokens_per_s": 55.0, "p50_s": 0.9, "p95_s": 1.0}},
    }
    derived = derive(plan, parts)
    (row,) = derived["estimates"]
    assert row["tensors_ratio"] == pytest.approx(37_996 / 36_000)
    assert row["total_ratio"] == pytest.approx(42_395 / 38_550) and "gpu_formula_total_mib" not in row
    model = flops_per_token(plan.big, "full", 640.0) * 8_000 / 1e12
    assert derived["mfu"]["lora"]["model_mfu_vs_989"] == pytest.approx(model / 989)
    assert derived["mfu"]["lora"]["model_mfu_vs_measured_matmul"] == pytest.approx(model / 800)
    assert derived["mfu"]["lora"]["lora_adjusted_tflops"] < model
    assert derived["tunekit_vs_trl"] == pytest.approx({"tokens_per_s_ratio": 1.25, "memory_ratio": 1.2})
    assert derived["serving"]["throughput_ratio"] == 8 and derived["serving"]["throughput_goal_met"]
    assert derived["serving"]["p95_ratio"] == pytest.approx(2.5 / 1.1) and not derived["serving"]["p95_goal_met"]
    text = summary_text(plan, parts, {"lora": 60.0}, derived)
    assert "qlora  timeout" in text and "killed at its cap of 110 s" in text
    assert "tensors_ratio 1.06" in text and "p95 x2.27 (goal <= 2: NOT met)" in text
