"""Which rollout engine a worker runs (`choose_engine`, pure), and building it (`make_engine`).

The engines: "hf" (`engine.HFDecodeEngine`, the HF model decoded in the rollout actor) and "vllm"
(`vllm_engine.VLLMEngine`). A new engine implements `engine.RolloutEngine` and gets a branch here.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..config.checks import VLLM_INSTALL
from ..models import load_causal_lm
from .engine import HFDecodeEngine, RolloutEngine
from .vllm_engine import VLLMEngine


def choose_engine(setting: str, device_type: str, vllm_present: bool) -> tuple[str, str]:
    """The engine of a rollout worker on `device_type`, and why: (name, reason). Pure.

    auto takes vLLM on a GPU when it is installed (the engine users run, and the fast one there), and the
    HF engine otherwise (on a CPU vLLM's CPU build is no faster than the HF decoder, docs/benchmarks.md).
    """
    if setting == "hf":
        return "hf", "rollout_engine: hf"
    if setting == "vllm":
        if not vllm_present:
            raise ModuleNotFoundError(f"rollout_engine: vllm, but vLLM is not installed here; {VLLM_INSTALL}")
        return "vllm", "rollout_engine: vllm"
    if device_type != "cuda":
        return "hf", f"rollout_engine: auto, and the rollout runs on the {device_type}"
    if not vllm_present:
        return "hf", f"rollout_engine: auto, and vLLM is not installed ({VLLM_INSTALL})"
    return "vllm", "rollout_engine: auto, vLLM is installed and the rollout runs on a GPU"


def vllm_sleeps(setting: "bool | str", device_type: str, gpu_share: float) -> bool:
    """Whether a vLLM rollout sleeps between rollouts: auto = on a fraction of a GPU (shared with a role)."""
    if device_type != "cuda":
        return False  # vLLM's CPU build has no sleep mode
    return gpu_share < 1 if setting == "auto" else bool(setting)


def make_engine(name: str, cfg, model_dir: str, device: torch.device, bf16: bool, gpu_share: float,
                on_death: Callable[[str], None] | None = None) -> RolloutEngine:
    """The rollout engine `name` ("hf" or "vllm", from `choose_engine`) on the policy weights in `model_dir`.
    `on_death(why)`: called if vLLM's own processes die (see `VLLMEngine._watch`)."""
    if name == "hf":
        return HFDecodeEngine(load_causal_lm(model_dir, bf16, cfg.attn_implementation).to(device))
    share = min(gpu_share, 1.0)
    return VLLMEngine(model_dir, device=device.type, dtype="bfloat16" if bf16 else "float32",
                      max_model_len=cfg.max_length, seed=cfg.seed,
                      gpu_memory_utilization=cfg.vllm_gpu_memory_utilization or 0.85 * share,
                      tensor_parallel_size=cfg.vllm_tensor_parallel_size, enforce_eager=cfg.vllm_enforce_eager,
                      sleep=vllm_sleeps(cfg.vllm_sleep, device.type, share), cpu_kv_cache_gib=cfg.vllm_cpu_kv_cache_gib,
                      log_level=cfg.log_level, on_death=on_death)
