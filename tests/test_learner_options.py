"""attn_implementation, gradient_checkpointing and offload_optimizer: each reaches the models and engines the
package builds, checkpointing leaves the gradients unchanged (plain and LoRA), and ZeRO-2 with the optimizer
offloaded to the CPU takes the same step as without."""

import copy
import importlib.util

import pytest
import torch
from conftest import base_config

from rlhf_dist.config import ConfigError, load_config
from rlhf_dist.config.schema import LORA_TARGETS
from rlhf_dist.models.attention import VARLEN_SDPA
from rlhf_dist.models.load import (
    ModelError,
    apply_lora,
    enable_gradient_checkpointing,
    is_checkpointing,
    load_causal_lm,
    load_scalar_model,
    token_scalars,
)

HAS_FLASH = importlib.util.find_spec("flash_attn") is not None


def _batch(vocab: int, n: int = 3, t: int = 14):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab, (n, t), generator=g)  # (B, T)
    attn = torch.ones(n, t, dtype=torch.long)
    attn[1, :4] = 0  # left padding on one row, right padding on another
    attn[-1, -3:] = 0
    return ids, attn


# --- attn_implementation --------------------------------------------------------------------------

def test_attn_implementation_reaches_the_loaded_models(tiny):
    path = str(tiny["model"])
    # the config's default, sdpa, loads as sdpa plus packed rows' sequence boundaries
    assert load_causal_lm(path).config._attn_implementation == VARLEN_SDPA
    eager = load_causal_lm(path, attn_implementation="eager")
    assert eager.config._attn_implementation == "eager"
    assert load_scalar_model(path, attn_implementation="eager").config._attn_implementation == "eager"
    ids, attn = _batch(eager.config.vocab_size)
    with torch.no_grad():
        a = eager(input_ids=ids, attention_mask=attn).logits
        b = load_causal_lm(path).eval()(input_ids=ids, attention_mask=attn).logits
    torch.testing.assert_close(a[attn.bool()], b[attn.bool()], rtol=1e-4, atol=1e-4)  # same math, other kernel


@pytest.mark.skipif(HAS_FLASH, reason="flash_attn is installed here")
def test_flash_attention_2_without_flash_attn_fails_before_loading(tiny, monkeypatch, tmp_path):
    # The driver need not have flash_attn (a cluster may have it on its GPU workers only): the config passes.
    load_config(base_config(tiny, tmp_path, device="auto", attn_implementation="flash_attention_2"))
    import transformers

    def never(*a, **k):
        raise AssertionError("from_pretrained was called")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", never)
    monkeypatch.setattr(transformers.AutoModelForSequenceClassification, "from_pretrained", never)
    with pytest.raises(ModelError, match="attn_implementation: flash_attention_2"):
        load_causal_lm(str(tiny["model"]), attn_implementation="flash_attention_2")
    with pytest.raises(ModelError, match="attn_implementation: flash_attention_2"):
        load_scalar_model(str(tiny["model"]), attn_implementation="flash_attention_2")


def test_flash_attention_2_needs_cuda_and_bf16(tiny, tmp_path):
    with pytest.raises(ConfigError, match="flash_attention_2 needs a CUDA GPU, but device is cpu"):
        load_config(base_config(tiny, tmp_path, attn_implementation="flash_attention_2"))
    with pytest.raises(ConfigError, match="flash_attention_2 runs only in bf16"):
        load_config(base_config(tiny, tmp_path, device="cuda", bf16=False, attn_implementation="flash_attention_2"))
    with pytest.raises(ConfigError, match="attn_implementation"):
        load_config(base_config(tiny, tmp_path, attn_implementation="flex_attention"))


def test_sft_task_gets_the_options(tiny, tmp_path):
    from rlhf_dist.offline.task import build_task

    cfg = load_config(base_config(tiny, tmp_path, attn_implementation="eager", gradient_checkpointing=True))
    task = build_task(cfg, "sft", world=1)
    assert task.model.config._attn_implementation == "eager"
    assert is_checkpointing(task.model)
    plain = build_task(load_config(base_config(tiny, tmp_path)), "reward", world=1)
    assert plain.model.config._attn_implementation == VARLEN_SDPA and not is_checkpointing(plain.model)


# --- gradient_checkpointing -----------------------------------------------------------------------

def _grads(model, loss_of) -> dict[str, torch.Tensor]:
    model.train()
    model.zero_grad()
    loss_of(model).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _lm_loss(model):
    ids, attn = _batch(model.config.vocab_size)
    return model(input_ids=ids, attention_mask=attn, labels=ids.masked_fill(attn == 0, -100), use_cache=False).loss


def _scalar_loss(model):
    ids, attn = _batch(model.config.vocab_size)
    return (token_scalars(model, ids, attn) * attn).pow(2).sum()


@pytest.mark.parametrize("kind", ["causal_lm", "scalar"])
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_gradient_checkpointing_gives_the_same_gradients(tiny, kind, lora):
    load, loss_of = (load_causal_lm, _lm_loss) if kind == "causal_lm" else (load_scalar_model, _scalar_loss)

    def build(ckpt: bool):
        torch.manual_seed(0)  # the scalar head and the adapters start the same in both models
        model = load(str(tiny["model"]))
        if ckpt:
            enable_gradient_checkpointing(model)
        if lora:
            model = apply_lora(model, 4, 8.0, 0.0, LORA_TARGETS, ["score"] if kind == "scalar" else None)
            with torch.no_grad():  # PEFT starts B at zero, which would leave A without a gradient
                for n, p in model.named_parameters():
                    if "lora_B" in n:
                        p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(n)))
        return model

    plain, ckpt = build(False), build(True)
    assert is_checkpointing(ckpt) and not is_checkpointing(plain)
    g0, g1 = _grads(plain, loss_of), _grads(ckpt, loss_of)
    assert g0.keys() == g1.keys() and len(g0) > 0
    if lora:
        assert any(".lora_A." in n for n in g0) and all(".lora_" in n or "score" in n for n in g0)
    for n, g in g0.items():
        assert g.abs().sum() > 0, n
        torch.testing.assert_close(g1[n], g, rtol=1e-5, atol=1e-7, msg=n)


# --- offload_optimizer ----------------------------------------------------------------------------

def test_offload_optimizer_config(tiny, tmp_path):
    from rlhf_dist.runtime.distributed import ds_config

    with pytest.raises(ConfigError, match="offload_optimizer: true needs zero_stage >= 1"):
        load_config(base_config(tiny, tmp_path, zero_stage=0, offload_optimizer=True))
    load_config(base_config(tiny, tmp_path, zero_stage=1, offload_optimizer=True))
    kw = {"micro_batch": 2, "grad_accum": 1, "world_size": 1, "grad_clip": 1.0, "bf16": False}
    c = ds_config(zero_stage=2, offload_optimizer=True, **kw)
    assert c["zero_optimization"]["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
    assert c["zero_force_ds_cpu_optimizer"] is False  # DeepSpeed accepts our torch AdamW with the offload
    assert "offload_optimizer" not in ds_config(zero_stage=2, **kw)["zero_optimization"]
    with pytest.raises(ValueError, match="zero_stage >= 1"):
        ds_config(zero_stage=0, offload_optimizer=True, **kw)


def test_zero2_offload_takes_the_same_step(tiny, gloo_group):
    from rlhf_dist.runtime.distributed import make_engine

    model = load_causal_lm(str(tiny["model"]))
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids, attn = _batch(model.config.vocab_size, n=2)
    after = {}
    for offload in (False, True):
        engine = make_engine(copy.deepcopy(model), lr=1e-2, total_steps=1, warmup_steps=0, micro_batch=2,
                             grad_accum=1, zero_stage=2, grad_clip=1.0, bf16=False, constant_lr=True,
                             offload_optimizer=offload)
        assert bool(engine.zero_cpu_offload()) == offload
        engine.backward(engine(input_ids=ids, attention_mask=attn, labels=ids, use_cache=False).loss)
        engine.step()
        after[offload] = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    moved = 0
    for n, p0 in start.items():
        torch.testing.assert_close(after[True][n], after[False][n], rtol=1e-6, atol=1e-7, msg=n)
        moved += not torch.equal(after[True][n], p0)
    assert moved > len(start) // 2  # a real step happened


def test_learner_setup_applies_the_options(tiny, tmp_path, gloo_group):
    """PPO's policy and critic learners: attention kernel, checkpointing and offload from the config."""
    import torch.distributed as dist

    from rlhf_dist.roles.calls import free_port
    from rlhf_dist.roles.learner import Learner

    conf = base_config(tiny, tmp_path, attn_implementation="eager", gradient_checkpointing=True,
                       offload_optimizer=True, zero_stage=2)
    for kind in ("policy", "critic"):
        learner = Learner(kind, 0, 1, conf, 1, "cpu")
        learner.setup("127.0.0.1", free_port(), str(tiny["model"]), total_steps=1)
        module = learner.engine.module
        assert module.config._attn_implementation == "eager", kind
        assert is_checkpointing(module), kind
        assert learner.engine.zero_cpu_offload(), kind
    assert dist.is_initialized()


# --- scripts/bench_learner.py ---------------------------------------------------------------------

def test_bench_learner_runs_every_phase_with_the_options():
    """The benchmark on a micro model, with checkpointing and offload: every phase reports, last line JSON."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    cmd = [sys.executable, "scripts/bench_learner.py", "--device", "cpu", "--hidden", "32", "--layers", "1",
           "--heads", "2", "--kv-heads", "1", "--intermediate", "64", "--vocab", "128", "--tokens", "96",
           "--seq-len", "16", "--min-len", "4", "--micro-batch", "3", "--steps", "1", "--warmup", "0",
           "--zero", "2", "--grad-ckpt", "--offload", "--attn", "eager"]
    r = subprocess.run(cmd, check=False, cwd=root, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(r.stdout.strip().splitlines()[-1])
    assert set(report["phases"]) == {"sft", "policy", "critic"}
    for phase, f in report["phases"].items():
        assert f["tokens_per_s"] > 0 and 0 < f["mfu"] < 1 and f["peak_mem_mb"] > 0, phase
        assert 0 < f["padding_fraction"] < 1, phase  # lengths drawn from [4, 16]: micro-batches have padding
        assert f["micro_batches_per_step"] * f["micro_batch"] == f["sequences_per_step"], phase
    assert report["phases"]["critic"]["flop_head_params"] == 0
    assert report["settings"]["grad_ckpt"] and report["settings"]["offload"]
