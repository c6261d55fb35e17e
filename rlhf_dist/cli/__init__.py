"""The `rlhf-dist` command (commands.py) and the modules behind its subcommands: doctor (doctor.py) and the
one-line failure report (failures.py)."""

from .commands import main

__all__ = ["main"]
