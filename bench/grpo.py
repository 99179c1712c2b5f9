"""tunekit GRPO against TRL's GRPOTrainer on the same model, prompts, reward, LoRA settings and CPU, each in a fresh
process.

    python -m bench.grpo --preset cpu-small [--runs tunekit,trl] [--repeat N (default 3)] [--trl-gc]

Builds the bench tokenizer and the preset's random-init model (bench/data.py) and a reinforcement prompt file
from the same generator as the SFT bench's chats (a conversation up to its last user turn is the prompt; the
answer that followed is the line's `answer` field, which the reward reads), runs each stack in its own
subprocess (bench/run_grpo_tunekit.py, bench/run_grpo_trl.py), checks that both sampled from the same prompt
token ids in the same order, takes each child's peak RSS from the kernel (os.wait4), prints the table and the
line `grpo vs trl: X.XXx steps/s, Y.YYx completions/s, Z.ZZx memory` and writes bench/results/grpo-<preset>.json.

What both stacks run (GrpoBench below, the same for each): `prompts_per_step` prompts per optimizer step, each
with `group_size` completions sampled at temperature 1 (no top-p / top-k) up to `max_new_tokens` new tokens,
one generation per optimizer step (the importance ratio is 1), the reward a tunekit grader (text_similarity
fuzzy_match against the line's answer, TRL's reward function calling tunekit.eval.graders.grade on the
completion text decoded as tunekit decodes it), advantages (reward - group mean) / (group std + 1e-4), the DAPO
token-mean loss (tunekit loss_norm: token, TRL loss_type "dapo") with clip epsilon 0.2 and the k3 KL to the
reference at beta 0.04 (TRL's default factor of the importance ratio on it, use_bias_correction_kl, is turned
off: tunekit's loss has none; tests/test_grpo_trl.py checks that the two losses and gradients are then equal),
the reference being the model with the LoRA adapter switched off, LoRA r/alpha of the preset on all linear
layers, the preset's lr (constant), fp32, the preset's torch threads, one epoch of the prompts in `steps`
optimizer steps (GRPO_STEPS), in the same prompt order (TRL's sampler without shuffling reads them in tunekit's epoch order), no gradient checkpointing
(TRL's default turns it on: --trl-gc keeps it). TRL generates with transformers' `generate` (its default path,
no vLLM); tunekit with its own engine (generate/engine.py). Both train the step's completions in one step; TRL
in one forward/backward of all of them (per_device_train_batch_size), tunekit in micro-batches of one prompt's
group (train.micro_batch_size = group_size: the same gradient, accumulated; completions of one prompt share its
length, so little padding). With all of a step's completions in one forward, as TRL, tunekit measured 1.89x
steps/s, 1.44x completions/s and 0.67x memory (docs/benchmarks.md).

Measured (RolloutClock, the same hooks in both children): optimizer steps/s after `warmup_steps` steps (the clock
starts at the end of the last warm-up step); completions/s of the rollouts: the completions sampled in the
measured steps over the wall time of their generation, from the start of the first to the end of the last model
call that reads a KV cache in a step (tunekit's engine: its probe of the cache path, the prefill and every
decoding step; transformers' generate: the prefill and every decoding step; generate's set-up and its last
sampling fall outside, so TRL's figure is, if anything, flattered); peak RSS of the process. The same rates per
second of the thread's CPU time are recorded too: on a shared machine the wall-clock rates follow the share of
a core each process got, the CPU-time rates do not.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from bench.data import TextGen, build_model_dir, build_tokenizer, make_example, write_jsonl
from bench.presets import PRESETS, Preset
from bench.sft import bench_arguments, interleaved_rounds, machine, median_attempt

ROOT = Path(__file__).resolve().parents[1]
RUNS = ("tunekit", "trl")
SEED = 42  # train.seed / TRL's seed: tunekit's prompt order and rollout seeds derive from it

# The reward: how close the completion is to the answer the conversation had (a continuous score, so groups
# of a random-init model's completions differ and advantages are not all 0).
GRADER = {"type": "text_similarity", "name": "similar", "input": "{{sample.output_text}}",
          "reference": "{{item.answer}}", "evaluation_metric": "fuzzy_match"}


@dataclass(frozen=True)
class GrpoBench:
    """The GRPO settings both stacks run with (besides the preset's model, LoRA, lr, precision and threads)."""

    prompts_per_step: int = 4
    group_size: int = 4  # TRL's num_generations
    max_new_tokens: int = 64  # TRL's max_completion_length
    temperature: float = 1.0
    beta: float = 0.04
    epsilon: float = 0.2
    steps: int = 12  # optimizer steps: one epoch of steps x prompts_per_step prompts
    warmup_steps: int = 3

    @property
    def completions_per_step(self) -> int:
        return self.prompts_per_step * self.group_size

    @property
    def n_prompts(self) -> int:
        return self.steps * self.prompts_per_step

    def to_dict(self) -> dict:
        return {**asdict(self), "completions_per_step": self.completions_per_step, "n_prompts": self.n_prompts}


# (optimizer steps, warm-up steps) where the preset's own would take too long: a GRPO step samples and trains,
# 2-8 s on cpu-small on 2 shared cores: one round of both stacks at the preset's 12 steps took about 3 minutes,
# at 8 steps a bit over 1.5, so that three interleaved rounds (the default) take about 5.
GRPO_STEPS = {"cpu-small": (8, 2)}


def settings(preset: Preset) -> GrpoBench:
    """The GRPO settings of a preset: its steps and warm-up (GRPO_STEPS where set; a GPU preset samples more
    per step)."""
    steps, warmup = GRPO_STEPS.get(preset.name, (preset.steps, preset.warmup_steps))
    if preset.device == "cuda":
        return GrpoBench(prompts_per_step=16, group_size=8, max_new_tokens=256, steps=steps, warmup_steps=warmup)
    return GrpoBench(steps=steps, warmup_steps=warmup)


# --------------------------------------------------------------------------------------------------
# Prompts


def prompt_ids(line: dict, tokenizer) -> list[int]:
    """The prompt as TRL tokenizes it: the chat template over the messages with the generation prompt."""
    return list(tokenizer.apply_chat_template(line["messages"], add_generation_prompt=True, tokenize=True,
                                              return_dict=True)["input_ids"])


def make_prompts(preset: Preset, tokenizer, n: int, max_prompt: int, seed: int) -> list[dict]:
    """`n` reinforcement lines: a chat of bench/data.py (log-normal length around the preset's median, no tools)
    up to its last user turn is `messages`, the assistant answer that followed is `answer`; `id` is the line's
    place. Prompts over `max_prompt` tokens are redrawn."""
    gen = TextGen(seed)
    lines: list[dict] = []
    while len(lines) < n:
        target = int(math.exp(gen.rng.gauss(math.log(preset.median_tokens), 0.7)))
        example = make_example(gen, min(target, preset.seq_len))
        if "tools" in example:
            continue
        *messages, answer = example["messages"]
        line = {"messages": messages, "answer": answer["content"], "id": len(lines)}
        if len(prompt_ids(line, tokenizer)) <= max_prompt:
            lines.append(line)
    return lines


def ids_digest(prompts: list[list[int]]) -> str:
    """sha256 of the prompt token ids, in order."""
    return hashlib.sha256(json.dumps([list(map(int, p)) for p in prompts]).encode()).hexdigest()


def prepare(preset: Preset, bench: GrpoBench, workdir: Path, seed: int = 0) -> dict:
    """Tokenizer, model dir, prompts.jsonl (tunekit reads it) and prompts-trl.jsonl (TRL's form, in the order
    tunekit's epoch takes the prompts) under `workdir`; their paths and token counts."""
    from tunekit.data.render import render_prompt
    from tunekit.train.grpo import prompt_order

    workdir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(preset.tokenizer_vocab, seed)
    lines = make_prompts(preset, tokenizer, bench.n_prompts, preset.seq_len - bench.max_new_tokens, seed)
    write_jsonl(lines, workdir / "prompts.jsonl")
    # tunekit's epoch 0 order (grpo.step_prompts): TRL's sampler, not shuffling, reads the file in this order.
    order = prompt_order(len(lines), SEED, 0)
    write_jsonl([for_trl(lines[i]) for i in order], workdir / "prompts-trl.jsonl")
    model_dir = build_model_dir(preset, tokenizer, workdir / "model", seed)
    ids = [prompt_ids(line, tokenizer) for line in lines]
    if any(render_prompt({"messages": line["messages"]}, tokenizer) != p for line, p in zip(lines, ids, strict=True)):
        raise RuntimeError("tunekit renders a prompt to other token ids than the chat template (TRL's way)")
    lengths = sorted(len(p) for p in ids)
    return {"model_dir": str(model_dir), "train": str(workdir / "prompts.jsonl"),
            "train_trl": str(workdir / "prompts-trl.jsonl"), "n_prompts": len(lines),
            "prompt_tokens": sum(lengths), "prompt_p50": lengths[len(lengths) // 2], "prompt_max": lengths[-1],
            "step_order": [order[s * bench.prompts_per_step:(s + 1) * bench.prompts_per_step]
                           for s in range(bench.steps)],
            "ids_sha256": ids_digest([ids[i] for i in order])}


def for_trl(line: dict) -> dict:
    """TRL's conversational row: the messages as `prompt`, the whole line as a JSON string (`item`, the grader's
    item, as tunekit hands it the line)."""
    return {"prompt": line["messages"], "item": json.dumps(line)}


# --------------------------------------------------------------------------------------------------
# What both children measure, the same way


class RolloutClock:
    """Per optimizer step: when it ended, and how long its generation took, from forward hooks on the causal LM
    (public torch API; every model call of both stacks goes through it: under tunekit's engine and under
    transformers' `generate` alike). A call that reads a KV cache is generation (the prefill and each decoding
    step); the step's generation window runs from the start of the first such call to the end of the last.
    Both in wall-clock and in this thread's CPU time: with 1 torch thread, torch runs its ops in the calling
    thread, so the CPU time is the work done, whatever share of the cores the shared machine gave the process.
    Calls with grad enabled are training forwards; their rows are counted (TRL's: the completions trained;
    tunekit's training runs the LM's body and head separately, not through this call)."""

    def __init__(self, sync=None):
        self.sync = sync  # torch.cuda.synchronize on a GPU, so that the clock reads finished work
        self.ends: list[float] = []
        self.cpu_ends: list[float] = []
        self.gen_wall: list[float] = []
        self.gen_cpu: list[float] = []
        self.rows: list[int] = []
        self._first: tuple[float, float] | None = None
        self._last: tuple[float, float] | None = None
        self._rows = 0

    @staticmethod
    def _now() -> tuple[float, float]:
        return time.perf_counter(), time.thread_time()

    @staticmethod
    def _generation(kwargs: dict) -> bool:
        # transformers 5.24 names the cache argument `cache` (`past_key_values` before, still accepted)
        return kwargs.get("cache") is not None or kwargs.get("past_key_values") is not None

    def _before(self, _module, _args, kwargs) -> None:
        import torch

        if self._generation(kwargs):
            if self._first is None:
                self._first = self._now()
        elif torch.is_grad_enabled() and kwargs.get("input_ids") is not None:
            self._rows += kwargs["input_ids"].shape[0]

    def _after(self, _module, _args, kwargs, _output) -> None:
        if self._generation(kwargs):
            if self.sync:
                self.sync()
            self._last = self._now()

    def attach(self, lm) -> list:
        """Hooks on `lm` (the causal LM, under any peft wrapper); their handles."""
        return [lm.register_forward_pre_hook(self._before, with_kwargs=True),
                lm.register_forward_hook(self._after, with_kwargs=True)]

    def attach_at_first_call(self) -> list:
        """For a model built out of reach (inside tunekit's `train`): a global forward pre-hook that attaches to
        the first causal LM called, then removes itself (the hooks time that LM's calls from its second on)."""
        from torch.nn.modules.module import register_module_forward_pre_hook
        from transformers import PreTrainedModel

        handles: list = []

        def find(module, _args):
            if isinstance(module, PreTrainedModel) and type(module).__name__.endswith("ForCausalLM"):
                handles.extend(self.attach(module))
                handles[0].remove()

        handles.append(register_module_forward_pre_hook(find))
        return handles

    def step_end(self) -> None:
        """Close a step (call at the end of each optimizer step)."""
        if self.sync:
            self.sync()
        wall, cpu = self._now()
        self.ends.append(wall)
        self.cpu_ends.append(cpu)
        first, last = self._first, self._last
        self.gen_wall.append(last[0] - first[0] if first and last else 0.0)
        self.gen_cpu.append(last[1] - first[1] if first and last else 0.0)
        self.rows.append(self._rows)
        self._first = self._last = None
        self._rows = 0


def rollout_throughput(clock: RolloutClock, completions: list[int], generated: list[int], warmup: int) -> dict:
    """Steps/s after `warmup` steps (the last warm-up step's end starts the clock), and completions/s and
    generated tokens/s of the rollouts of those steps over their generation time; each also per CPU second."""
    ends, cpu_ends = clock.ends, clock.cpu_ends
    if len(ends) <= warmup + 1 or warmup < 1:
        raise ValueError(f"{len(ends)} steps: need warm-up >= 1 and more than warm-up + 1 steps")
    if not len(ends) == len(completions) == len(generated):
        raise ValueError(f"per-step lists of different lengths: {len(ends)} steps, {len(completions)} completions, "
                         f"{len(generated)} generated")
    seconds, cpu_seconds = ends[-1] - ends[warmup - 1], cpu_ends[-1] - cpu_ends[warmup - 1]
    gen, gen_cpu = sum(clock.gen_wall[warmup:]), sum(clock.gen_cpu[warmup:])
    measured = sum(completions[warmup:])
    return {"steps": len(ends), "measured_steps": len(ends) - warmup, "measured_seconds": seconds,
            "steps_per_s": (len(ends) - warmup) / seconds,
            "completions_per_s": measured / gen,
            "generated_tokens_per_s": sum(generated[warmup:]) / gen,
            "generation_share": gen / seconds,  # of the measured steps' wall time
            # the same per second of this thread's CPU time (load-independent on a shared machine)
            "steps_per_cpu_s": (len(ends) - warmup) / cpu_seconds, "completions_per_cpu_s": measured / gen_cpu,
            "cpu_share": cpu_seconds / seconds,  # the share of a core the measured steps got
            "completions": sum(completions), "generated_tokens": sum(generated),
            "completions_per_step": completions, "generated_per_step": generated,
            "generation_seconds_per_step": clock.gen_wall, "generation_cpu_seconds_per_step": clock.gen_cpu,
            "step_seconds": [b - a for a, b in zip(ends[:-1], ends[1:], strict=True)]}


# --------------------------------------------------------------------------------------------------
# The comparison


def child_command(run: str, preset: Preset, workdir: Path, out: Path, trl_gc: bool) -> list[str]:
    module = "bench.run_grpo_tunekit" if run == "tunekit" else "bench.run_grpo_trl"
    cmd = [sys.executable, "-m", module, "--preset", preset.name, "--workdir", str(workdir), "--out", str(out)]
    return cmd + (["--gc"] if run == "trl" and trl_gc else [])


def table(results: dict[str, dict]) -> str:
    lines = [f"{'run':<10}{'steps':>6}{'compl.':>7}{'gen tok':>9}{'steps/s':>9}{'compl./s':>10}{'gen tok/s':>11}"
             f"{'gen share':>10}{'steps/cpu-s':>12}{'compl./cpu-s':>13}{'cpu share':>10}{'peak RSS MiB':>14}"
             f"{'reward 1st/last':>17}{'wall s':>8}"]
    for name, r in results.items():
        if "steps_per_s" not in r:
            lines.append(f"{name:<10}  failed (exit {r.get('returncode')}), see {r.get('log')}")
            continue
        rewards = r["step_rewards"]
        lines.append(f"{name:<10}{r['steps']:>6}{r['completions']:>7}{r['generated_tokens']:>9}"
                     f"{r['steps_per_s']:>9.3f}{r['completions_per_s']:>10.2f}{r['generated_tokens_per_s']:>11.0f}"
                     f"{r['generation_share']:>10.0%}{r['steps_per_cpu_s']:>12.3f}{r['completions_per_cpu_s']:>13.2f}"
                     f"{r['cpu_share']:>10.0%}{r['child_maxrss_mib']:>14.0f}"
                     f"{f'{rewards[0]:.3f}/{rewards[-1]:.3f}':>17}{r['wall_seconds']:>8.0f}")
    return "\n".join(lines)


def main() -> None:
    parser = bench_arguments(__doc__, RUNS, "grpo-<preset>", 3,
                             "rounds of all runs, interleaved (each stack's median round by steps/s is reported)")
    parser.add_argument("--trl-gc", action="store_true", help="keep TRL's default gradient checkpointing")
    args = parser.parse_args()
    preset = PRESETS[args.preset]
    bench = settings(preset)
    runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    if unknown := [r for r in runs if r not in RUNS]:
        parser.error(f"unknown runs {unknown}; choose from {', '.join(RUNS)}")
    if preset.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            parser.error(f"preset {preset.name} needs a CUDA GPU; on CPU use cpu-small or cpu-medium")

    workdir = args.workdir or Path("/tmp/tunekit-bench") / f"grpo-{preset.name}"
    print(f"preparing {preset.name} prompts, tokenizer and model in {workdir} ...", flush=True)
    data = prepare(preset, bench, workdir)
    print(f"  {data['n_prompts']} prompts ({data['prompt_tokens']} tokens, p50 {data['prompt_p50']}, max "
          f"{data['prompt_max']}); {bench.steps} steps of {bench.prompts_per_step} prompts x {bench.group_size} "
          f"completions of up to {bench.max_new_tokens} tokens", flush=True)

    def report(run: str, result: dict, proc: dict) -> str:
        same = result["ids_sha256"] == data["ids_sha256"] and result["step_order"] == data["step_order"]
        return (f"{result['steps_per_s']:.3f} steps/s, {result['completions_per_s']:.2f} completions/s, peak RSS "
                f"{proc['child_maxrss_mib']:.0f} MiB, prompts {'as rendered, in order' if same else 'DIFFERENT'}, "
                f"load avg {proc['loadavg_before'][0]:.1f}")

    attempts = interleaved_rounds(runs, args.repeat, workdir,
                                  lambda run, out: child_command(run, preset, workdir, out, args.trl_gc), report)
    results: dict[str, dict] = {}
    for run, tries in attempts.items():
        chosen, done = median_attempt(tries, "steps_per_s")
        results[run] = {**chosen, **{f"{key}_all_rounds": [t[key] for t in done] for key in (
            "steps_per_s", "completions_per_s", "steps_per_cpu_s", "completions_per_cpu_s", "child_maxrss_mib")}}

    print()
    print(table(results))
    record = {"command": " ".join(["python -m bench.grpo", *sys.argv[1:]]), "preset": preset.to_dict(),
              "grpo": bench.to_dict(), "grader": GRADER, "loss": "dapo (tunekit loss_norm: token)", "data": data,
              "machine": machine(), "trl_gradient_checkpointing": args.trl_gc, "runs": results,
              "same_prompts": {run: r.get("ids_sha256") == data["ids_sha256"]
                               and r.get("step_order") == data["step_order"] for run, r in results.items()}}
    tk, trl = results.get("tunekit", {}), results.get("trl", {})
    if "steps_per_s" in tk and "steps_per_s" in trl:
        record["ratios"] = {**{key: tk[key] / trl[key] for key in (
            "steps_per_s", "completions_per_s", "steps_per_cpu_s", "completions_per_cpu_s")},
            "peak_rss": tk["child_maxrss_mib"] / trl["child_maxrss_mib"]}
    args.results.mkdir(parents=True, exist_ok=True)
    path = args.results / f"grpo-{preset.name}{f'-{args.tag}' if args.tag else ''}.json"
    record["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    path.write_text(json.dumps(record, indent=2))
    print(f"\nwritten {path}")
    if "ratios" in record:
        r = record["ratios"]
        print(f"per CPU second (the load of a shared machine left out): {r['steps_per_cpu_s']:.2f}x steps, "
              f"{r['completions_per_cpu_s']:.2f}x completions")
        print(f"grpo vs trl: {r['steps_per_s']:.2f}x steps/s, {r['completions_per_s']:.2f}x completions/s, "
              f"{r['peak_rss']:.2f}x memory")


if __name__ == "__main__":
    main()
