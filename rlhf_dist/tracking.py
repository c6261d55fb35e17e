"""Run logs and local metrics files (each stage's `metrics.jsonl`)."""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from pathlib import Path

from .config import redact, secret_values

LOG_FORMAT = "%(asctime)s %(levelname)s [%(role)s] %(name)s: %(message)s"


class _Context(logging.Filter):
    """Adds the role (driver, sft-worker-0, rollout-1, ...) to records and redacts secrets."""

    def __init__(self, role: str):
        super().__init__()
        self.role = role
        self.secrets = secret_values()

    def filter(self, record: logging.LogRecord) -> bool:
        record.role = self.role
        if self.secrets:
            record.msg = redact(record.getMessage(), self.secrets)
            record.args = None
        return True


def setup_logging(level: str = "INFO", log_dir: str | os.PathLike | None = None, role: str = "driver") -> None:
    """Log to stderr and, with `log_dir`, append to `log_dir/run.log` (shared by the driver and workers)."""
    root = logging.getLogger()
    for h in list(root.handlers):
        # In Ray workers, drop the handlers Ray installed too: ours already reach the driver via stderr.
        if getattr(h, "_rlhf_dist", False) or role != "driver":
            root.removeHandler(h)
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_dir is not None:
        Path(log_dir).mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(Path(log_dir) / "run.log", encoding="utf-8"))
    ctx = _Context(role)
    for h in handlers:
        h._rlhf_dist = True
        h.setFormatter(logging.Formatter(LOG_FORMAT))
        h.addFilter(ctx)
        root.addHandler(h)
    root.setLevel(level)
    try:  # weight-loading progress bars would drown the run's own progress
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass
    for noisy in ("urllib3", "filelock", "DeepSpeed", "deepspeed", "torch.distributed"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLevelName(level)))


class MetricsWriter:
    """Append one JSON object per line; flushed per line so nothing is lost on a crash."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "a", encoding="utf-8")

    def write(self, record: dict) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        clean.setdefault("time", time.time())
        self._f.write(json.dumps(clean) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def read_metrics(path: str | os.PathLike) -> list[dict]:
    p = Path(path)
    if not p.is_file():
        return []
    return [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
