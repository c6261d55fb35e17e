"""Recovery after an actor died: which actors died since the last look (Ray restarts the frozen ones)."""

from __future__ import annotations

import time

from ..roles.placement import ROLES


def dead_actors(roles, pids: dict[tuple[str, int], int], setup_timeout_s: float) -> list[tuple[str, int]]:
    """Actors that died since the last look: gone (no restarts left) or restarted under a new pid. `pids`
    ((role, rank) -> pid) is updated with the new pids."""
    import ray  # deferred: loading ray takes seconds
    from ray.exceptions import (  # deferred: loading ray takes seconds
        ActorUnavailableError,
        GetTimeoutError,
        RayActorError,
    )

    def pid_of(actor, known: int) -> int | None:  # None: gone for good
        deadline = time.time() + setup_timeout_s
        while True:
            try:
                return ray.get(actor.info.remote(), timeout=10)["pid"]
            except ActorUnavailableError:  # Ray is restarting it
                if time.time() > deadline:
                    return None
                time.sleep(0.2)
            except GetTimeoutError:  # alive but busy (e.g. hung): not a death, nothing to restore
                return known
            except RayActorError:
                return None

    dead = []
    for role in ROLES:
        for rank, actor in enumerate(getattr(roles, role)):
            pid = pid_of(actor, pids[(role, rank)])
            if pid is None:
                dead.append((role, rank))
            elif pid != pids[(role, rank)]:
                pids[(role, rank)] = pid
                dead.append((role, rank))
    return dead
