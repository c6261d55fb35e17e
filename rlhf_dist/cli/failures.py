"""An internal failure as one line on stderr and an exit code; its traceback goes to `save_dir/logs/run.log`.

A run that fails on a cluster (a role died, a timeout, an NCCL error) should say who failed, in which phase
and why, in one line; the 40-line traceback is for whoever debugs it, so it goes to the run log.
"""

from __future__ import annotations

import logging
import re
import sys
import traceback
from pathlib import Path

from ..config import redact
from ..io.tracking import LOG_FORMAT
from ..runtime.errors import PhaseTimeout, PlacementError, RoleFailure

# Every exit code of `rlhf-dist` (README "Exit codes"); 3 is also doctor's EXIT_NO_FIT.
EXIT = {"stopped": 1, "user": 2, "placement": 3, "role": 4, "timeout": 5, "collective": 6, "train": 7,
        "internal": 70, "interrupted": 130}
LABEL = {"placement": "cannot be placed", "role": "a role failed", "timeout": "timeout",
         "collective": "collective communication error", "train": "Ray Train stage failed",
         "internal": "internal error, please report it"}

# NCCL / gloo failures that torch raises as a plain RuntimeError (newer torch: DistBackendError).
_COLLECTIVE_TEXT = re.compile(r"NCCL|nccl[A-Z]|Duplicate GPU detected|gloo/|ProcessGroupGloo")
# Exceptions that only carry another one (`cause`, Ray Train's worker failures): judged by what they carry.
_WRAPPERS = ("RoleFailure", "PhaseTimeout", "PlacementError", "TrainingFailedError", "RayTaskError")
MAX_CAUSE = 300  # characters of the cause kept on the line


def _named(exc: BaseException, *names: str) -> bool:
    """By class name, so neither Ray nor torch has to be imported to judge an exception."""
    return any(c.__name__ in names for c in type(exc).__mro__)


def _is_collective(exc: BaseException) -> bool:
    return _named(exc, "DistError") or (not _named(exc, *_WRAPPERS) and bool(_COLLECTIVE_TEXT.search(str(exc))))


# Most specific first: the first kind found anywhere in the cause chain decides the exit code.
KINDS = (
    ("collective", _is_collective),
    ("placement", lambda e: isinstance(e, PlacementError)),
    ("timeout", lambda e: isinstance(e, PhaseTimeout)),
    ("train", lambda e: _named(e, "TrainingFailedError")),
    ("role", lambda e: isinstance(e, RoleFailure)),
)


def _carried(exc: BaseException) -> list[BaseException]:
    """What `exc` was caused by: `raise ... from`, a remote call's cause, Ray Train's worker/controller failures."""
    out = [getattr(exc, "cause", None), exc.__cause__, getattr(exc, "controller_failure", None),
           getattr(exc, "health_check_failure", None)]
    failures = getattr(exc, "worker_failures", None)
    if isinstance(failures, dict):
        out += [failures[r] for r in sorted(failures)]
    return [e for e in out if isinstance(e, BaseException)]


def cause_chain(exc: BaseException) -> list[BaseException]:
    seen, todo, out = set(), [exc], []
    while todo and len(out) < 50:  # a cycle or a huge worker group must not hang the error path
        e = todo.pop(0)
        if id(e) not in seen:
            seen.add(id(e))
            out.append(e)
            todo += _carried(e)
    return out


def classify(exc: BaseException) -> str:
    chain = cause_chain(exc)
    return next((kind for kind, test in KINDS if any(test(e) for e in chain)), "internal")


def one_line(text: str, limit: int = MAX_CAUSE) -> str:
    """First and last line (NCCL puts the useful part last), shortened in the middle."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    text = lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1]}" if lines else ""
    return text if len(text) <= limit else f"{text[:limit // 2]} ... {text[-(limit // 2):]}"


def summary(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {one_line(str(exc))}" if str(exc).strip() else type(exc).__name__


def failed_stage(exc: BaseException) -> str | None:
    """The pipeline stage running when `exc` was raised (the innermost `_timed`/`run_supervised` frame)."""
    stage = None
    for frame, _ in traceback.walk_tb(exc.__traceback__):
        if frame.f_code.co_name in ("_timed", "run_supervised") and isinstance(frame.f_locals.get("stage"), str):
            stage = frame.f_locals["stage"]
    return stage


def describe(exc: BaseException, command: str) -> str:
    """`role: phase: cause` in one line."""
    stage = failed_stage(exc) or command
    if isinstance(exc, (RoleFailure, PhaseTimeout, PlacementError)):  # their messages name role and phase
        text, cause = str(exc), getattr(exc, "cause", None)
        if cause is not None and text.endswith(repr(cause)):  # a repr can hold a whole remote traceback
            text = text[: -len(repr(cause))] + summary(cause)
        return one_line(text, 2 * MAX_CAUSE)
    if _named(exc, "TrainingFailedError"):
        failures = getattr(exc, "worker_failures", None) or {}
        rank = min(failures) if failures else None
        root = failures[rank] if failures else getattr(exc, "controller_failure", None) or exc
        role = f"{stage}-worker" + (f"-{rank}" if rank is not None else "")
        return f"{role}: phase 'train' failed: {summary(root)}"
    return f"driver: phase '{stage}' failed: {summary(exc)}"


def log_traceback(exc: BaseException, line: str, path: Path) -> None:
    """Append the traceback to the run log only: the root logger's stderr handler must not see it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    tb = "".join(traceback.format_exception(exc))
    record = logging.LogRecord("rlhf_dist.cli.commands", logging.ERROR, __file__, 0, redact(f"{line}\n{tb.rstrip()}"),
                               None, None)
    record.role = "driver"
    try:
        handler.handle(record)
    finally:
        handler.close()


def report_failure(exc: BaseException, command: str, save_dir: str | None) -> int:
    """Print one line naming role, phase, cause and the run log; return the kind's exit code."""
    kind = classify(exc)
    head = f"rlhf-dist: failed: {describe(exc, command)} (exit {EXIT[kind]}, {LABEL[kind]}"
    where = "no run log: it failed before the config was loaded"
    if save_dir is not None:
        path = Path(save_dir) / "logs" / "run.log"
        where = f"traceback in {path}"
        try:
            log_traceback(exc, f"{head})", path)
        except OSError as e:  # an unwritable save_dir must not hide the failure itself
            where = f"could not write {path}: {e.strerror}"
    print(f"{head}; {where})", file=sys.stderr)
    return EXIT[kind]
