"""The GPU path, run on CPU where torch allows it (docs/gpu.md): bf16 weights with fp32 LoRA adapters, bf16
autocast through the chunked LM-head loss, gradient checkpointing with LoRA in bf16, the attention
implementations; what a machine without CUDA (or a GPU without bf16) refuses before any weight loads; and the
GPU memory estimate's activation formula against the tensors autograd really keeps."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from toy_runs import packed, random_sequences, toy_config

from tunekit.config import RunConfig
from tunekit.data.pack import collate_packed
from tunekit.errors import ConfigError
from tunekit.model import apply_method, body_and_head, device_problems, load_base
from tunekit.train.estimate import (
    ALLOCATOR_OVERHEAD,
    CUDA_CONTEXT,
    MB,
    activation_bytes,
    estimate_memory,
    model_shapes,
)
from tunekit.train.loop import autocast, backward_step, train
from tunekit.train.sft import TrainedNLL, trained_nll

CUDA = torch.device("cuda")


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.grad is not None}


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0))


def random_lora_b(model, seed: int = 1) -> None:
    """lora_B starts at zero (no gradient reaches lora_A then): make both get one."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


# --------------------------------------------------------------------------------------------------
# bf16 weights, bf16 autocast, chunked LM head, gradient checkpointing, attention implementations


def test_lora_on_bf16_weights_trains_fp32_adapters_only(tmp_path, tiny_llama_dir):
    """tunekit's default on a GPU: bf16 weights (dtype auto), LoRA adapters kept in fp32 by peft. A step
    changes the adapters only, and their gradients point where an all-fp32 run's do."""
    cfg = toy_config(tmp_path, tiny_llama_dir, model={"dtype": "bf16"})
    model = apply_method(load_base(cfg), cfg)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n for n in trained)
    assert {p.dtype for n, p in model.named_parameters() if n in trained} == {torch.float32}
    assert {p.dtype for n, p in model.named_parameters() if n not in trained} == {torch.bfloat16}
    random_lora_b(model)
    batch = packed(random_sequences(6, 3))
    nll, n, _ = backward_step(TrainedNLL(model, 4096), [batch], "cpu")
    bf16 = grads(model)

    ref_cfg = toy_config(tmp_path, tiny_llama_dir, model={"dtype": "fp32"})
    ref = apply_method(load_base(ref_cfg), ref_cfg)
    with torch.no_grad():  # the same adapter (lora_A is drawn at random)
        for name, p in ref.named_parameters():
            if name in trained:
                p.copy_(dict(model.named_parameters())[name])
    nll32, n32, _ = backward_step(TrainedNLL(ref, 4096), [batch], "cpu")
    fp32 = grads(ref)
    assert n == n32 and nll == pytest.approx(nll32, rel=2e-2) and nll != nll32  # bf16 did run
    assert bf16.keys() == fp32.keys() == trained
    for name, g in bf16.items():
        assert cosine(g, fp32[name]) > 0.98, name

    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    opt.step()
    changed = {k for k, p in model.named_parameters() if not torch.equal(p, before[k])}
    assert changed == trained


def test_gradient_checkpointing_with_lora_on_bf16_weights(tmp_path, tiny_llama_dir):
    """The same adapter gradients with and without checkpointing (non-reentrant: the frozen bf16 inputs
    need no grad, the fp32 adapters inside the checkpointed layers still get theirs)."""
    cfg = toy_config(tmp_path, tiny_llama_dir, model={"dtype": "bf16"})
    model = apply_method(load_base(cfg), cfg)
    model.train()
    random_lora_b(model)
    batch = packed(random_sequences(4, 2))
    backward_step(TrainedNLL(model, 4096), [batch], "cpu")
    plain = grads(model)
    model.zero_grad()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert body_and_head(model)[0].gradient_checkpointing
    backward_step(TrainedNLL(model, 4096), [batch], "cpu")
    checkpointed = grads(model)
    assert plain.keys() == checkpointed.keys() and len(plain) == 2 * 7 * 2  # A and B, 7 linears, 2 layers
    for name, g in plain.items():  # recomputation repeats the same bf16 arithmetic
        torch.testing.assert_close(checkpointed[name], g, atol=1e-5, rtol=1e-3)


@pytest.mark.parametrize("method", ["full", "lora"])
def test_chunked_lm_head_under_bf16_autocast_equals_one_chunk(tmp_path, tiny_llama_dir, method):
    """mixed_precision: bf16 (autocast) with the LM head in chunks of 64 rows, each recomputed in backward:
    the same loss and gradients as one chunk of every trained position, and close to fp32."""
    cfg = toy_config(tmp_path, tiny_llama_dir, method=method)
    model = apply_method(load_base(cfg), cfg)
    if method == "lora":
        random_lora_b(model)
    batch = collate_packed([random_sequences(4, 0), random_sequences(4, 1)], pad_id=0)
    results = {}
    for name, chunk, mixed in (("chunked", 64, "bf16"), ("whole", 4096, "bf16"), ("fp32", 4096, "no")):
        model.zero_grad()
        with autocast("cpu", mixed):
            nll, n, correct = trained_nll(model, batch, chunk)
        (nll / n).backward()
        assert n == batch.num_trained > 64  # several chunks
        results[name] = (float(nll) / n, correct, grads(model))
    (loss_c, right_c, g_c), (loss_w, right_w, g_w), (loss_32, _, g_32) = (results[k] for k in
                                                                           ("chunked", "whole", "fp32"))
    assert loss_c == pytest.approx(loss_w, rel=1e-3) and right_c == right_w
    assert loss_c == pytest.approx(loss_32, rel=2e-2) and loss_c != loss_32
    assert g_c.keys() == g_w.keys() == g_32.keys() and g_c
    for name, g in g_c.items():
        assert g.dtype == torch.float32
        assert cosine(g, g_w[name]) > 0.999, name
        assert cosine(g, g_32[name]) > 0.97, name


def test_sdpa_and_eager_attention_agree_on_packed_rows(tmp_path, tiny_llama_dir):
    """Both attention implementations a CPU runs keep packed sequences apart (from position_ids): the same
    loss and adapter gradients. flash_attention_2 (CUDA only) is refused here, before weights load."""
    batch = collate_packed([random_sequences(5, 7), random_sequences(3, 8)], pad_id=0)
    out = {}
    for attn in ("sdpa", "eager"):
        cfg = toy_config(tmp_path, tiny_llama_dir, model={"attn_implementation": attn})
        torch.manual_seed(0)  # the same lora_A draw
        model = apply_method(load_base(cfg), cfg)
        assert model.config._attn_implementation == attn
        random_lora_b(model)
        nll, n, _ = backward_step(TrainedNLL(model, 4096), [batch], "cpu")
        out[attn] = (nll / n, grads(model))
    torch.testing.assert_close(out["sdpa"][0], out["eager"][0], atol=1e-5, rtol=1e-5)
    for name, g in out["sdpa"][1].items():
        torch.testing.assert_close(out["eager"][1][name], g, atol=1e-5, rtol=1e-4)
    flash = toy_config(tmp_path, tiny_llama_dir, model={"attn_implementation": "flash_attention_2"})
    assert [p.where for p in device_problems(flash, cuda=False)] == ["model.attn_implementation"]


# --------------------------------------------------------------------------------------------------
# What is refused without CUDA (or without bf16), from the config alone


def settings(tmp_path, tiny_llama_dir, **sections) -> RunConfig:
    return toy_config(tmp_path, tiny_llama_dir, **sections)


def test_cuda_only_settings_are_refused_on_a_machine_without_cuda(tmp_path, tiny_llama_dir):
    cfg = settings(tmp_path, tiny_llama_dir, train={"device": "cuda"},
                   model={"attn_implementation": "flash_attention_2"})
    problems = device_problems(cfg, cuda=False, flash=True)
    assert [p.where for p in problems] == ["train.device", "model.attn_implementation"]
    assert "no CUDA device is visible" in problems[0].message and "train.device: auto or cpu" in problems[0].hint
    assert "flash_attention_2 needs CUDA" in problems[1].message and "auto" in problems[1].hint
    # What runs on a CPU too is not refused there: bf16 weights and autocast, qlora, fp16 weights.
    for ok in (dict(model={"dtype": "bf16"}, train={"mixed_precision": "bf16"}),
               dict(method="qlora", quant={"compute_dtype": "bf16"}), dict(model={"dtype": "fp16"})):
        assert device_problems(settings(tmp_path, tiny_llama_dir, **ok), cuda=False) == []
    if not torch.cuda.is_available():  # this machine's own facts
        assert [p.where for p in device_problems(cfg)] == ["train.device", "model.attn_implementation"]


def test_a_gpu_without_bf16_refuses_bf16_and_flash_in_fp32(tmp_path, tiny_llama_dir):
    """On a GPU older than Ampere (V100, T4): every bf16 setting is refused, and flash-attention with weights
    that would load in fp32 (dtype auto resolves to fp32 there)."""
    cfg = settings(tmp_path, tiny_llama_dir, method="qlora", model={"dtype": "bf16"},
                   train={"mixed_precision": "bf16"}, quant={"compute_dtype": "bf16"})
    problems = device_problems(cfg, cuda=True, bf16=False, flash=True)
    assert [p.where for p in problems] == ["model.dtype", "train.mixed_precision", "quant.compute_dtype"]
    assert all("compute capability 8.0" in p.message for p in problems)
    flash = settings(tmp_path, tiny_llama_dir, model={"attn_implementation": "flash_attention_2"})
    (problem,) = device_problems(flash, cuda=True, bf16=False, flash=True)
    assert "fp32" in problem.message and "model.dtype: bf16" in problem.hint
    assert device_problems(flash, cuda=True, bf16=True, flash=True) == []  # auto -> bf16 on Ampere and later
    assert len(device_problems(flash, cuda=True, bf16=True, flash=False)) == 1  # the package is missing
    cpu = settings(tmp_path, tiny_llama_dir, model={"dtype": "bf16"}, train={"device": "cpu"})
    assert device_problems(cpu, cuda=True, bf16=False) == []  # the CPU of a GPU machine trains in bf16


def test_cuda_settings_are_refused_before_any_weight_loads(tmp_path, tiny_llama_dir):
    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    broken = tmp_path / "no-weights"
    shutil.copytree(tiny_llama_dir, broken)
    (broken / "model.safetensors").unlink()  # loading weights would fail with another error
    cfg = settings(tmp_path, broken, train={"device": "cuda"}, model={"attn_implementation": "flash_attention_2"})
    with pytest.raises(ConfigError) as err:
        train(cfg)
    assert {"train.device", "model.attn_implementation"} <= {p.where for p in err.value.problems}
    assert not cfg.output.dir.exists()


# --------------------------------------------------------------------------------------------------
# The GPU memory estimate


def saved_bytes(model, input_ids: torch.Tensor, mixed: str = "no") -> int:
    """Bytes of the tensors autograd keeps for backward in one forward of the decoder body (each storage once,
    parameters left out): what a GPU holds as activations, whatever the device."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    body, _ = body_and_head(model)
    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast("cpu", mixed):
        body(input_ids=input_ids, use_cache=False)
    return sum(seen.values())


@pytest.fixture(scope="module")
def medium_dirs(tmp_path_factory) -> dict[int, Path]:
    """Llama-shaped, hidden 256, with 1 and with 3 layers: big enough that the per-layer terms dominate what
    the formula leaves out."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    dirs = {}
    for layers in (1, 3):
        config = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=688, num_hidden_layers=layers,
                             num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
        torch.manual_seed(0)
        dirs[layers] = tmp_path_factory.mktemp(f"medium-{layers}")
        AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(dirs[layers])
    return dirs


CASES = {  # name: (config sections, act bytes, adapter bytes, copies), as estimate_cuda sets them
    "full bf16": (dict(method="full", model={"dtype": "bf16"}), 2, 2, False),
    "lora bf16": (dict(model={"dtype": "bf16"}), 2, 4, True),
    "lora fp32": (dict(model={"dtype": "fp32"}), 4, 4, False),
    "lora fp32 + autocast": (dict(model={"dtype": "fp32"}, train={"mixed_precision": "bf16"}), 2, 2, True),
    "qlora bf16": (dict(method="qlora", model={"dtype": "bf16"}), 4, 4, False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_activation_formula_matches_the_tensors_autograd_keeps(tmp_path, medium_dirs, case):
    """Per decoder layer and token, `activation_bytes` (the GPU formula's core) against the storages torch's
    saved-tensor hooks see, measured as the difference between a 3-layer and a 1-layer model (what lies
    outside the layers cancels). Transformers saves the same tensors on a GPU; only SDPA's kernels differ
    there, and they keep the same q, k, v, output and log-sum-exp as the CPU's flash kernel used here."""
    sections, act, adapter, copies = CASES[case]
    if case.startswith("qlora"):
        pytest.importorskip("bitsandbytes")
    tokens = 256
    ids = torch.randint(0, 512, (1, tokens), generator=torch.Generator().manual_seed(0))
    measured = {}
    for layers in (1, 3):
        cfg = toy_config(tmp_path, medium_dirs[layers], **sections)
        model = apply_method(load_base(cfg), cfg)
        measured[layers] = saved_bytes(model, ids, cfg.train.mixed_precision)
    per_layer = (measured[3] - measured[1]) / 2
    shapes = model_shapes(cfg)
    formula = activation_bytes(shapes, full=cfg.method == "full", act=act, adapter=adapter, copies=copies,
                               r=cfg.lora.r)
    # autocast keeps the bf16 copy of each fp32 weight it multiplies with for backward
    casts = shapes.layer_params * 2 if cfg.train.mixed_precision == "bf16" else 0
    assert per_layer == pytest.approx(formula * tokens + casts, rel=0.08), (case, per_layer, formula * tokens, casts)
    if case == "lora bf16":  # peft's fp32 copies of each adapted linear's input: ~1.4x the full bf16 layer
        assert formula > 1.3 * activation_bytes(shapes, full=True, act=2, adapter=2, copies=False, r=0)


def test_gradient_checkpointing_keeps_only_each_layers_input(tmp_path, medium_dirs):
    """With checkpointing a bf16 layer keeps its input (hidden x 2 bytes per token), as the formula says."""
    tokens, measured = 256, {}
    ids = torch.randint(0, 512, (1, tokens), generator=torch.Generator().manual_seed(0))
    for layers in (1, 3):
        cfg = toy_config(tmp_path, medium_dirs[layers], model={"dtype": "bf16"})
        model = apply_method(load_base(cfg), cfg)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        measured[layers] = saved_bytes(model, ids)
    assert (measured[3] - measured[1]) / 2 / tokens == pytest.approx(256 * 2, rel=0.05)


def test_gpu_estimate_terms(tmp_path):
    """The GPU formula on an 8B Llama shape (config.json only, built on the meta device): bf16 weights with
    fp32 adapters, 4-bit weights for qlora, checkpointing, eager attention, CUDA context and overhead."""
    from transformers import LlamaConfig

    LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False).save_pretrained(tmp_path / "8b")

    shapes = {}  # lora and qlora train the same adapter: one meta-device build each for it and for full

    def estimate(**sections):
        sections.setdefault("data", {"max_len": 2048})
        sections.setdefault("lora", {"r": 16, "alpha": 32})
        cfg = toy_config(tmp_path, tmp_path / "8b", **sections)
        key = cfg.method == "full"
        shapes[key] = shapes.get(key) or model_shapes(cfg)
        return estimate_memory(cfg, shapes[key], micro_batch=1, processes=1, strategy="none", device=CUDA)

    lora = estimate(model={"dtype": "bf16"})
    assert lora.device == "cuda" and lora.baseline == CUDA_CONTEXT
    assert lora.overhead == pytest.approx(ALLOCATOR_OVERHEAD * lora.tensors, abs=1)
    assert lora.total == lora.baseline + lora.tensors + lora.overhead
    # 8.03B parameters at 2 bytes, the 42M adapter parameters (r 16 on 7 linears x 32 layers) at 4.
    assert lora.weights == pytest.approx(8.03e9 * 2 + 42e6 * 2, rel=0.01)
    assert lora.gradients == pytest.approx(42e6 * 4, rel=0.01) and lora.optimizer == 2 * lora.gradients
    assert 15_000 < lora.activations / MB < 25_000  # 2048 tokens x 32 layers x ~295 KB
    assert "GPU" in lora.lines()[0] and "CUDA context" in lora.lines()[0]
    assert estimate(model={"dtype": "auto"}).total == lora.total  # auto is bf16 on a GPU
    ckpt = estimate(model={"dtype": "bf16"}, train={"gradient_checkpointing": True})
    assert ckpt.activations < lora.activations / 10 and ckpt.weights == lora.weights
    qlora = estimate(method="qlora", model={"dtype": "bf16"})
    assert qlora.weights < lora.weights / 1.8 and qlora.activations > lora.activations  # fp32 residual stream
    eager = estimate(model={"dtype": "bf16", "attn_implementation": "eager"})
    # each layer keeps 32 heads x 2048^2 probabilities in fp32 and bf16
    assert eager.activations - lora.activations == 32 * 32 * 2048 * 2048 * 6
    full = estimate(method="full", model={"dtype": "bf16"})
    assert full.optimizer == 2 * full.gradients == 2 * full.weights  # AdamW state in bf16, like the weights
    cpu = estimate_memory(toy_config(tmp_path, tmp_path / "8b", method="full", data={"max_len": 2048}),
                          shapes[True], micro_batch=1, processes=1, strategy="none", baseline=0,
                          device=torch.device("cpu"))
    assert cpu.device == "cpu" and cpu.overhead == 0 and cpu.weights == pytest.approx(8.03e9 * 4, rel=0.01)
