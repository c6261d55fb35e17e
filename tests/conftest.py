"""Shared fixtures: tiny HF assets built once per session, and a local Ray that tests shut down."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest

from rlhf_dist.pipeline import PREEMPTION_WATCHER

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("RAY_TRAIN_ENABLE_CONTROLLER_STRUCTURED_LOGGING", "0")
os.environ.setdefault("RAY_TRAIN_ENABLE_WORKER_STRUCTURED_LOGGING", "0")
os.environ.setdefault(PREEMPTION_WATCHER, "0")  # as ray_session does on a Ray it starts itself


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """A small tokenizer + Llama model + demo data (hidden 64, 2 layers: fast on 2 cores)."""
    from rlhf_dist.demo.tiny import build_tiny

    return build_tiny(tmp_path_factory.mktemp("tiny"), seed=0, hidden_size=64, num_layers=2, intermediate_size=128)


@pytest.fixture(scope="session")
def tiny_sft(tiny, tmp_path_factory):
    """The tiny model after SFT on the demo conversations (2 epochs, batch 32, AdamW 2e-3, one process, no Ray):
    it answers in the demo's format, half positive, half negative. For end-to-end tests of the later stages
    (policy_model_path), so that each need not run an SFT job of its own."""
    import random

    import torch

    from rlhf_dist.data.encode import tokenize_sft
    from rlhf_dist.data.read import read_dataset
    from rlhf_dist.models.load import load_causal_lm, load_tokenizer, save_hf
    from rlhf_dist.steps.sft import sft_batch, sft_count, sft_loss

    tok = load_tokenizer(str(tiny["model"]))
    rows, stats = read_dataset(tiny["sft"], "sft")
    items = tokenize_sft(tok, rows, 64, False, stats)
    torch.manual_seed(0)
    model = load_causal_lm(str(tiny["model"]))
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    for epoch in range(2):
        order = list(range(len(items)))
        random.Random(epoch).shuffle(order)
        for s in range(len(items) // 32):
            batch = [items[i] for i in order[s * 32:(s + 1) * 32]]
            loss, _ = sft_loss(model, sft_batch(batch, tok.pad_token_id), float(sft_count(batch)))
            opt.zero_grad()
            loss.backward()
            opt.step()
    out = tmp_path_factory.mktemp("tiny_sft") / "model"
    save_hf(model, tok, out)
    return out


@pytest.fixture(scope="session")
def tiny_vllm(tmp_path_factory):
    """The tiny assets with 2 attention heads of 32 dims: vLLM's CPU attention takes head sizes of 32 and up."""
    from rlhf_dist.demo.tiny import build_tiny

    return build_tiny(tmp_path_factory.mktemp("tiny_vllm"), seed=0, hidden_size=64, num_layers=2, num_heads=2,
                      intermediate_size=128)


@pytest.fixture
def gloo_group():
    """A one-rank gloo group for a test's DeepSpeed engines, destroyed after it. DeepSpeed caches a clone of
    the world group, which is forgotten too, so that a later test can start a group of its own."""
    import sys

    import torch.distributed as dist

    from rlhf_dist.roles.calls import free_port
    from rlhf_dist.runtime.distributed import init_local_group_env

    init_local_group_env(0, 1, "127.0.0.1", free_port())
    dist.init_process_group("gloo", rank=0, world_size=1)
    yield
    if dist.is_initialized():
        dist.destroy_process_group()
    groups = sys.modules.get("deepspeed.utils.groups")
    if groups is not None:
        groups._WORLD_GROUP = None


@pytest.fixture
def drop_log_handlers():
    """setup_logging's handlers (a role's, a run's) point at this test's captured stderr and save_dir: remove
    them after it."""
    import logging

    yield
    root = logging.getLogger()
    for h in [h for h in root.handlers if getattr(h, "_rlhf_dist", False)]:
        root.removeHandler(h)
        h.close()


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray on loopback for one test module; shut down after it (never `ray stop`)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", configure_logging=False,
             runtime_env={"env_vars": {"RAY_TRAIN_ENABLE_WORKER_STRUCTURED_LOGGING": "0"}})
    yield ray
    ray.shutdown()


@contextlib.contextmanager
def fault_hooked_ray(plan_dir: Path):
    """A local Ray on loopback whose workers run `faults.install` (tests/faults.py) with the plan at
    plan_dir/plan.json, empty to start with; yields the plan's path and shuts Ray down after."""
    import faults
    import ray

    plan = plan_dir / "plan.json"
    faults.plan(plan, [])
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", configure_logging=False,
             runtime_env={"worker_process_setup_hook": "faults.install",
                          "env_vars": {faults.ENV: str(plan),  # tests/ for `faults`, then this process's own path
                                       "PYTHONPATH": os.pathsep.join(filter(None, (str(Path(__file__).parent),
                                                                                   os.environ.get("PYTHONPATH"))))}})
    try:
        yield plan
    finally:
        ray.shutdown()


def tiny_llama(tiny, kv_heads: int):
    """A randomly initialised Llama of the tiny model's shape with `kv_heads` key-value heads (seed 0),
    in eval mode, and the tiny tokenizer."""
    import torch
    from transformers import AutoConfig, LlamaForCausalLM

    from rlhf_dist.models.load import load_tokenizer

    cfg = AutoConfig.from_pretrained(tiny["model"])
    cfg.num_key_value_heads = kv_heads
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval(), load_tokenizer(str(tiny["model"]))


def base_config(tiny, save_dir, **overrides) -> dict:
    """A short run on the tiny assets; tests override what they exercise."""
    cfg = {
        "model_name": str(tiny["model"]), "device": "cpu", "seed": 0, "max_length": 64,
        "sft_data_path": str(tiny["sft"]), "sft_epochs": 1, "sft_batch_size": 32, "sft_lr": 2e-3,
        "reward_data_path": str(tiny["prefs"]), "reward_epochs": 1, "reward_batch_size": 32, "reward_lr": 1e-3,
        "ppo_data_path": str(tiny["prompts"]), "ppo_iterations": 3, "ppo_batch_size": 16,
        "ppo_mini_batch_size": 8, "ppo_epochs": 1, "ppo_lr_policy": 2e-4, "ppo_lr_value": 1e-3,
        "gen_max_new_tokens": 16, "save_interval": 2, "save_dir": str(save_dir),
        "roles": {r: {"num_cpus": 0.4} for r in ("rollout", "policy", "critic", "reference", "reward")},
    }
    cfg.update(overrides)
    return cfg


def iteration_rows(save_dir) -> list[dict]:
    """PPO metric rows, one per iteration (without the summary row)."""
    from rlhf_dist.io.tracking import read_metrics

    return [r for r in read_metrics(Path(save_dir) / "ppo" / "metrics.jsonl") if not r.get("summary")]


def assert_in_nucleus(probs, tokens, mask, top_p: float, top_k: int) -> None:
    """Each sampled token (tokens (B, R) where mask) is among what top-k, then top-p renormalised over the
    top-k, leave of its distribution probs (B, R, V)."""
    for p_row, tok_id in zip(probs[mask], tokens[mask]):  # (V,), ()
        order = p_row.argsort(descending=True)
        kept = order[:top_k] if top_k else order
        q = p_row[kept] / p_row[kept].sum()  # renormalised after top-k
        kept = kept[: int((q.cumsum(0) - q < top_p).sum())]  # the smallest prefix with mass >= top_p
        assert tok_id in kept.tolist()
