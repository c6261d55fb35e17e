"""`rlhf-dist run CONFIG`, except that the driver SIGKILLs itself at a chosen point (a real crash).
Start it in a new session: it kills its own process group.

    python tests/fault_driver.py CONFIG sft-checkpoint        after SFT's first Ray Train checkpoint is registered
    python tests/fault_driver.py CONFIG mid-save:NAME         while writing ppo/NAME: files written, no manifest yet
"""

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

from rlhf_dist.cli import commands as cli
from rlhf_dist.online import setup as ppo  # where save_iteration writes state.json


def die() -> None:
    """SIGKILL this driver's process group: the driver and the local Ray it started (its workers exit
    when their raylet is gone), as when the driver's machine or container dies."""
    os.killpg(0, signal.SIGKILL)


def arm(config: str, where: str) -> None:
    kind, _, arg = where.partition(":")
    if kind == "sft-checkpoint":
        snapshot = Path(json.loads(Path(config).read_text())["save_dir"], "ray_train", "sft",
                        "checkpoint_manager_snapshot.json")

        def registered() -> bool:
            try:
                return bool(json.loads(snapshot.read_text())["checkpoint_results"])
            except (OSError, ValueError, KeyError):  # not there yet, or caught mid-write
                return False

        def watch():
            while not registered():
                time.sleep(0.05)
            die()

        threading.Thread(target=watch, daemon=True).start()
    elif kind == "mid-save":
        write = ppo.write_json_atomic

        def write_or_die(path, obj):
            if Path(path).parent.name.startswith(f".{arg}.tmp-"):
                die()
            return write(path, obj)

        ppo.write_json_atomic = write_or_die
    else:
        raise SystemExit(f"unknown fault point {where!r}")


if __name__ == "__main__":
    arm(sys.argv[1], sys.argv[2])
    sys.exit(cli.main(["run", sys.argv[1]]))
