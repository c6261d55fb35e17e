"""Fault injection for the resilience tests, from outside the package.

Ray runs `install` in every worker process (`worker_process_setup_hook`). It wraps the methods named
in the JSON plan at $RLHF_TEST_FAULTS, so that the Nth call in a process kills the process (or the processes
it started) with SIGKILL,
hangs, is `seconds` late, fails as if the disk were full, or makes a loss NaN. Each fault fires once per
run (a marker file is created atomically), so an actor that Ray restarts does not die again.
"""

from __future__ import annotations

import functools
import importlib
import json
import os
import signal
import time
from pathlib import Path

ENV = "RLHF_TEST_FAULTS"


def plan(path: Path, faults: list[dict]) -> None:
    """Write a plan: [{"target": "rlhf_dist.roles.actors:RolloutWorker.generate", "call": 2, "action": "kill"}]."""
    for f in path.parent.glob(f"{path.name}.fired-*"):
        f.unlink()
    path.write_text(json.dumps(faults))


def _fire_once(plan_path: str, index: int) -> bool:
    try:
        fd = os.open(f"{plan_path}.fired-{index}", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    os.close(fd)
    return True


def install() -> None:
    plan_path = os.environ.get(ENV)
    if not plan_path or not os.path.exists(plan_path):
        return
    for index, fault in enumerate(json.loads(Path(plan_path).read_text())):
        module, attr = fault["target"].split(":")
        owner = importlib.import_module(module)
        *path, name = attr.split(".")
        for part in path:
            owner = getattr(owner, part)
        _wrap(owner, name, fault, plan_path, index)


def _wrap(owner, name: str, fault: dict, plan_path: str, index: int) -> None:
    original = getattr(owner, name)
    calls = [0]

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        calls[0] += 1
        if calls[0] == fault["call"] and _fire_once(plan_path, index):
            if fault["action"] == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            elif fault["action"] == "kill_children":  # e.g. vLLM's engine and worker processes under an actor
                import psutil

                for child in psutil.Process().children(recursive=True):
                    child.kill()
            elif fault["action"] == "hang":
                time.sleep(3600)
            elif fault["action"] == "delay":
                time.sleep(fault["seconds"])
            elif fault["action"] == "enospc":
                raise OSError(28, "No space left on device")
            elif fault["action"] == "nan":  # a loss function's value becomes NaN
                loss, stats = original(*args, **kwargs)
                return loss * float("nan"), stats
        return original(*args, **kwargs)

    setattr(owner, name, wrapper)
