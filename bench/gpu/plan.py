"""What the GPU benchmark runs: the model shapes, steps, serving load and time caps of each part.

Two plans with the same parts: "gpu" (Llama-3.1-8B and Llama-3.2-1B shapes at seq 2048, random init, on
CUDA) and "cpu-smoke" (the same steps on tiny shapes on CPU, for tests/test_gpu_script.py). A plan travels to
each part's process as JSON.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

from bench.presets import PRESETS, Preset

PARTS = ("build", "lora", "trl", "qlora", "full", "serve")


@dataclass(frozen=True)
class Plan:
    name: str
    big: Preset  # LoRA (tunekit and TRL) and QLoRA
    small: Preset  # full fine-tuning and serving
    steps: int  # optimizer steps of every training run, the first `warmup` left out of tokens/s
    warmup: int
    batch_rows: int  # packed rows per step, one row per forward (micro-batch 1, accumulated)
    clients: int  # concurrent serving clients against one
    requests_one: int  # requests the one client sends, one after another
    requests_many: int  # requests the `clients` clients send together
    max_tokens: int  # tokens each request generates (at most)
    budget_s: int  # the whole run, build included; each part also has its own cap
    caps_s: dict[str, int] = field(default_factory=dict)
    reserve_s: int = 40  # kept for each later part when a part's cap is cut to fit the budget
    grace_s: int = 25  # a part is asked to stop this long before its cap kills it

    def preset(self, role: str) -> Preset:
        return self.big if role == "big" else self.small

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_dict(data: dict) -> Plan:
        return Plan(**{**data, "big": Preset(**data["big"]), "small": Preset(**data["small"])})


def gpu_plan() -> Plan:
    """About 5 minutes on one H100 if nothing stalls (an estimate: never run yet); the caps are cut to fit
    budget_s, which leaves the wheel install before it inside 9 minutes."""
    common = dict(n_train=120, n_eval=1, steps=12, warmup_steps=3)
    return Plan(
        name="gpu", big=replace(PRESETS["llama-3.1-8b"], name="llama-3.1-8b-shape", **common),
        small=replace(PRESETS["llama-3.2-1b"], name="llama-3.2-1b-shape", **common),
        steps=12, warmup=3, batch_rows=2, clients=16, requests_one=16, requests_many=32, max_tokens=48,
        budget_s=490, caps_s={"build": 150, "lora": 110, "trl": 110, "qlora": 110, "full": 80, "serve": 90})


def cpu_smoke_plan() -> Plan:
    """The same parts on CPU-sized shapes: seconds each, to test the script's logic, not to measure."""
    big = replace(PRESETS["cpu-tiny"], name="smoke-big", n_train=40, n_eval=1, steps=5, warmup_steps=2, threads=1)
    small = replace(big, name="smoke-small", hidden=32, heads=2, kv_heads=1, intermediate=64)
    return Plan(name="cpu-smoke", big=big, small=small, steps=5, warmup=2, batch_rows=2, clients=16,
                requests_one=4, requests_many=16, max_tokens=8, budget_s=400, grace_s=5, reserve_s=20,
                caps_s={"build": 90, "lora": 90, "trl": 120, "qlora": 90, "full": 90, "serve": 90})
