"""Which rollout engine a worker runs (`choose_engine`, pure), and building it (`make_engine`), from the
engine table (`config/engines.py`). The engines implement `engine.RolloutEngine`."""

from __future__ import annotations

import importlib
from typing import Callable

import torch

from ..config.engines import ENGINES
from .engine import RolloutEngine


def choose_engine(setting: str, device_type: str, installed: frozenset[str]) -> tuple[str, str]:
    """The engine of a rollout worker on `device_type`, given the `installed` engines, and why:
    (name, reason). Pure.

    auto takes the first installed row of the table that lists the device: vLLM on a GPU (the engine users
    run, and the fast one there), the HF decoder otherwise (on a CPU vLLM's CPU build is no faster,
    docs/benchmarks.md).
    """
    if setting != "auto":
        e = ENGINES[setting]
        if setting not in installed:
            raise ModuleNotFoundError(f"rollout_engine: {setting}, but {e.label} is not installed here; {e.install}")
        return setting, f"rollout_engine: {setting}"
    missing = []
    for e in ENGINES.values():
        if device_type not in e.auto_devices:
            continue
        if e.name in installed:
            where = "a GPU" if device_type == "cuda" else f"the {device_type}"
            why = f"rollout_engine: auto, {e.label} is installed and the rollout runs on {where}"
            return e.name, why + "".join(f"; {m}" for m in missing)
        missing.append(f"{e.label} is not installed ({e.install})")
    raise ModuleNotFoundError(f"rollout_engine: auto, but no installed engine runs on {device_type}")


def make_engine(name: str, cfg, model_dir: str, device: torch.device, bf16: bool, gpu_share: float,
                on_death: Callable[[str], None] | None = None) -> RolloutEngine:
    """The rollout engine `name` (from `choose_engine`) on the policy weights in `model_dir`, by its table
    row's `build`. `on_death(why)`: called if the engine's own processes die (see `VLLMEngine._watch`)."""
    module, fn = ENGINES[name].build.split(":")
    return getattr(importlib.import_module(module), fn)(cfg, model_dir, device, bf16, gpu_share, on_death)
