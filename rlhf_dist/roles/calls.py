"""Remote calls with timeouts whose errors name the role and the phase, and starting actors in their
placement-group bundles."""

from __future__ import annotations

import os
import socket
import time

from ..runtime.errors import PhaseTimeout, RoleFailure
from .placement import Slot


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def wait(refs, role: str, phase: str, timeout: float):
    """ray.get with a timeout; errors name the role and the phase."""
    import ray  # deferred: loading ray takes seconds
    from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError  # deferred: loading ray takes seconds

    try:
        return ray.get(refs, timeout=timeout)
    except GetTimeoutError:
        raise PhaseTimeout(f"{role}: phase '{phase}' timed out after {timeout:.0f}s") from None
    except RayActorError as e:
        raise RoleFailure(f"{role}: actor died during phase '{phase}': {e.__class__.__name__}", died=True) from e
    except RayTaskError as e:
        raise RoleFailure(f"{role}: phase '{phase}' failed: {e.cause!r}", cause=e.cause) from e


def actor_env(slot: Slot) -> dict[str, str]:
    """Environment of an actor: its thread count and, for a role sharing a GPU, expandable allocator segments,
    so memory it frees is not stranded in fragments the roles beside it cannot use. Not for the rollout:
    vLLM's sleep mode allocates through a memory pool that refuses expandable segments."""
    env = {"OMP_NUM_THREADS": str(max(1, round(slot.num_cpus)))}
    shared_gpu = slot.device == "cuda" and slot.num_gpus < 1
    if shared_gpu and slot.role != "rollout" and "PYTORCH_CUDA_ALLOC_CONF" not in os.environ:
        env["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
    return env


def spawn(cls, slot: Slot, pg, *args, max_restarts: int = 0):
    """Start `cls` as a Ray actor in its placement-group bundle."""
    import ray  # deferred: loading ray takes seconds
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy  # deferred: loading ray takes seconds

    opts = dict(num_cpus=slot.num_cpus, num_gpus=slot.num_gpus, max_restarts=max_restarts,
                scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=slot.bundle),
                name=None, runtime_env={"env_vars": actor_env(slot)})
    if slot.resources:
        opts["resources"] = slot.resources
    return ray.remote(cls).options(**opts).remote(*args)


def create_placement_group(bundles: list[dict], strategy: str, timeout: float):
    import ray  # deferred: loading ray takes seconds
    from ray.util.placement_group import placement_group  # deferred: loading ray takes seconds

    pg = placement_group(bundles, strategy=strategy)
    t = time.time()
    ready, _ = ray.wait([pg.ready()], timeout=timeout)
    if not ready:
        need: dict[str, float] = {}
        for b in bundles:
            for k, v in b.items():
                need[k] = need.get(k, 0) + v
        raise PhaseTimeout(f"placement: bundles {bundles} (total {need}) could not be placed in {time.time() - t:.0f}s; "
                           f"cluster has {ray.cluster_resources()}")
    return pg
