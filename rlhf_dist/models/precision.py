"""Which precision each model runs in, and what follows from it. Pure functions of settings and devices.

`bf16: auto` (the default) means bfloat16 on CUDA and float32 elsewhere; `true` asks for bf16 and is an
error without a GPU. A role that runs on the CPU in a GPU run (0 GPUs) stays in float32 either way.
"""

from __future__ import annotations

import logging

from ..config import ConfigError

log = logging.getLogger(__name__)


def use_bf16(setting: "bool | str", device_type: str) -> bool:
    """bf16 for a model on `device_type` ("cuda", "cpu", "mps")."""
    return setting is not False and device_type == "cuda"


def check_bf16(setting: "bool | str", device: str) -> bool:
    """The run's precision on its resolved device; logged. `bf16: true` without CUDA is an error."""
    if setting is True and device != "cuda":
        raise ConfigError(f"bf16: true needs a CUDA GPU, but the run's device is {device}; "
                          "use bf16: auto (bf16 on GPUs, float32 elsewhere) or false")
    on = use_bf16(setting, device)
    log.info("precision: bf16 %s on %s -> %s", setting, device, "bfloat16" if on else "float32")
    return on


def recompute_old_logprobs(setting: "bool | str", rollout_bf16: bool, learner_bf16: bool, overlap: bool) -> bool:
    """Whether PPO's old logprobs come from a forward pass of the policy learner instead of the rollout.

    The ratio of the first mini-batch must be 1: the old logprobs must be the learner's own. In float32 the
    rollout's decode (KV cache, its own kernels) agrees with the learner's forward to ~1e-6, so the
    rollout's logprobs serve and save a forward pass. In bf16 they differ by far more (bf16 keeps ~3
    significant digits, and the decode sums in another order), so `auto` recomputes whenever either side
    runs in bf16. With `ppo_overlap_rollout`, the rollout's logprobs carry the one-step lag that PPO's ratio
    corrects for; recomputing them with the updated weights would drop that correction.
    """
    want = (rollout_bf16 or learner_bf16) if setting == "auto" else bool(setting)
    if want and overlap:
        why = ("ppo_recompute_old_logprobs: true" if setting is True else
               "ppo_recompute_old_logprobs: auto recomputes them because the rollout or the learner runs in bf16")
        raise ConfigError(f"ppo_overlap_rollout: true needs the rollout's own logprobs as the old logprobs (they carry "
                          f"the one-step lag), but {why}. Turn ppo_overlap_rollout off, or set "
                          "ppo_recompute_old_logprobs: false to accept the precision mismatch")
    return want
