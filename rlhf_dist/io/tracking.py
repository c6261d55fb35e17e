"""Run logs and local metrics files (each stage's `metrics.jsonl`)."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import netrc
import os
import secrets
import sys
import threading
import time
from pathlib import Path

from tqdm import tqdm

from ..config import redact, secret_values
from ..config.stages import STAGES

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
        from transformers.utils import logging as hf_logging  # deferred: loading transformers takes seconds

        hf_logging.disable_progress_bar()
    except ImportError:
        pass
    for noisy in ("urllib3", "filelock", "DeepSpeed", "deepspeed", "torch.distributed"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLevelName(level)))


def quiet_local_ray_worker() -> None:
    """`worker_process_setup_hook` of the local Ray that rlhf-dist starts (without a dashboard). Ray Train's
    placement-group cleaner asks the dashboard's State API every second whether its controller still lives,
    and without a dashboard it logs a warning each time. A local Ray ends with its driver, bundles and all,
    so that watch has nothing to do here: silence it below errors."""
    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(logging.ERROR)


class Timers:
    """Seconds per named phase (rollout, experience, ..., or a stage's start-up), summed over its entries."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def phase(self, name: str):
        t = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t

    def summary(self) -> str:
        return ", ".join(f"{k} {v:.2f}s" for k, v in self.seconds.items())


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


def truncate_metrics(path: str | os.PathLike, key: str, upto: int) -> None:
    """Drop the rows whose `key` is above `upto` (work after the checkpoint a run resumes from, to be redone)."""
    p = Path(path)
    if not p.is_file():
        return
    lines = p.read_text(encoding="utf-8").splitlines(keepends=True)
    keep = [ln for ln in lines if ln.strip() and json.loads(ln).get(key, 0) <= upto]
    if len(keep) < len(lines):
        tmp = p.with_name(f".{p.name}.tmp")
        tmp.write_text("".join(keep), encoding="utf-8")
        os.replace(tmp, p)


def read_metrics(path: str | os.PathLike) -> list[dict]:
    p = Path(path)
    if not p.is_file():
        return []
    return [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]


# ---------------------------------------------------------------------------------------
# W&B (driver only) and the per-stage progress display, both fed from the metrics files
# ---------------------------------------------------------------------------------------

# WANDB_MODE values as wandb defines them (dryrun and run are its old names for offline and online).
_WANDB_MODES = {"online": "online", "run": "online", "shared": "online", "offline": "offline",
                "dryrun": "offline", "disabled": "disabled"}
# wandb's own default is 90 s, and its two login lookups add 5 s each: an unreachable server would
# hold the start of a run for minutes. WANDB_INIT_TIMEOUT (wandb's variable) overrides this.
INIT_TIMEOUT_S = 60.0


def wandb_mode(mode: str) -> str:
    """auto -> what WANDB_DISABLED / WANDB_MODE ask for when set, else online when an API key is
    available (environment or netrc), else offline."""
    if mode != "auto":
        return mode
    if os.environ.get("WANDB_DISABLED", "").strip().lower() in ("true", "1", "yes"):
        return "disabled"
    env_mode = _WANDB_MODES.get(os.environ.get("WANDB_MODE", "").strip().lower())
    if env_mode:
        return env_mode
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        if netrc.netrc().authenticators("api.wandb.ai"):
            return "online"
    except (OSError, netrc.NetrcParseError):
        pass
    return "offline"


def _reason(e: BaseException) -> str:
    """One line for a log: wandb's errors span several lines (retries, URLs)."""
    first = (str(e).strip().splitlines() or [""])[0]
    return redact(f"{type(e).__name__}: {first}"[:300])


class Tracker:
    """One W&B run per pipeline, resumed by id across restarts. wandb is imported only when on.

    Tracking never stops training: an unreachable server means an offline run to sync later, and any
    other W&B failure means one warning and no more tracking. The API key is never read here: wandb
    finds it in the environment or netrc itself.
    """

    def __init__(self, cfg, save_dir: Path, init_timeout: float | None = None):
        self.run = None
        self.mode = wandb_mode(cfg.wandb.mode)
        if self.mode == "disabled" or os.environ.get("WANDB_MODE") == "disabled":
            self.mode = "disabled"
            return
        try:
            if init_timeout is None:
                init_timeout = float(os.environ.get("WANDB_INIT_TIMEOUT") or INIT_TIMEOUT_S)
            self.run = self._start(cfg, save_dir, init_timeout)
            for prefix, (axis, _) in ((s.name, s.axis) for s in STAGES.values()):
                self.run.define_metric(f"{prefix}/{axis}")
                self.run.define_metric(f"{prefix}/*", step_metric=f"{prefix}/{axis}")
        except Exception as e:
            self._stop("could not start", e)
            return
        logging.getLogger(__name__).info("W&B run %s (%s) in %s", self.run.id, self.mode, save_dir / "wandb")

    def _start(self, cfg, save_dir: Path, init_timeout: float):
        import wandb  # deferred: loading wandb takes seconds

        id_file = save_dir / "wandb_run_id"
        run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(4)
        id_file.write_text(run_id)
        w = cfg.wandb
        kwargs = dict(project=w.project, entity=w.entity, name=w.name or save_dir.resolve().name, group=w.group,
                      tags=list(w.tags), config=redact(cfg.to_dict()), dir=str(save_dir), id=run_id,
                      resume="allow", settings=wandb.Settings(init_timeout=init_timeout))
        try:
            return wandb.init(mode=self.mode, **kwargs)
        except Exception as e:
            if self.mode != "online":
                raise
            reason = e
        wandb.teardown()  # the failed online run keeps its id busy in wandb's service
        self.mode = "offline"
        run = wandb.init(mode="offline", **kwargs)
        sync_dir = getattr(run.settings, "sync_dir", None) or save_dir / "wandb"
        logging.getLogger(__name__).warning("W&B unreachable (%s): logging offline instead; upload later "
                                            "with `wandb sync %s`", _reason(reason), sync_dir)
        return run

    def _stop(self, what: str, e: Exception) -> None:
        """Turn tracking off for the rest of the run, with one warning (the run itself goes on)."""
        self.run = None
        self.mode = "disabled"
        logging.getLogger(__name__).warning("W&B %s (%s): tracking is off for the rest of this run; "
                                            "metrics.jsonl files still have everything", what, _reason(e))

    def log(self, prefix: str, row: dict) -> None:
        if self.run is None:
            return
        try:
            self.run.log({f"{prefix}/{k}": v for k, v in row.items()
                          if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "time"})
        except Exception as e:
            self._stop("log failed", e)

    def table(self, name: str, rows: list[dict]) -> None:
        if self.run is None or not rows:
            return
        try:
            import wandb  # deferred: loading wandb takes seconds

            cols = list(dict.fromkeys(k for r in rows for k in r))  # rows may differ (samples.jsonl's flagged ones)
            self.run.log({name: wandb.Table(columns=cols, data=[[r.get(c) for c in cols] for r in rows])})
        except Exception as e:
            self._stop("log failed", e)

    def finish(self) -> None:
        if self.run is None:
            return
        run, self.run = self.run, None
        try:
            run.finish()
        except Exception as e:
            self._stop("finish failed", e)


class StageMonitor:
    """Follows a stage's metrics.jsonl from the driver: progress display (tqdm on a TTY, periodic log
    lines otherwise) and W&B logging. Works the same whether rows come from Ray Train workers or the
    PPO driver, because the file is the source of truth."""

    def __init__(self, stage: str, metrics_path: Path, tracker: Tracker | None, total: int | None = None,
                 samples_path: Path | None = None, interval: float = 1.0):
        self.stage, self.path, self.tracker, self.total = stage, Path(metrics_path), tracker, total
        self.samples_path = samples_path
        self.interval = interval
        self._pos = {self.path: self.path.stat().st_size if self.path.exists() else 0}
        if samples_path is not None:
            self._pos[samples_path] = samples_path.stat().st_size if samples_path.exists() else 0
        self._stop = threading.Event()
        self._bar = None
        self._last_log = 0.0
        self._thread = threading.Thread(target=self._loop, daemon=True, name=f"monitor-{stage}")

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._poll()  # rows written just before the end
        if self._bar is not None:
            self._bar.close()

    def _new_rows(self, path: Path) -> list[dict]:
        if not path.exists():
            return []
        if path.stat().st_size < self._pos[path]:  # truncated by a resume: follow from its new end
            self._pos[path] = path.stat().st_size
        with open(path, encoding="utf-8") as f:
            f.seek(self._pos[path])
            data = f.read()
        end = data.rfind("\n") + 1  # only whole lines
        self._pos[path] += len(data[:end].encode("utf-8"))
        return [json.loads(line) for line in data[:end].splitlines() if line.strip()]

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._poll()

    def _poll(self) -> None:
        axis, key = STAGES[self.stage].axis
        log = logging.getLogger("rlhf_dist.progress")
        for row in self._new_rows(self.path):
            if row.get("summary"):
                continue
            if self.tracker is not None:
                self.tracker.log(self.stage, row)
            total = self.total or row.get("total_steps")
            done = row.get(axis, 0)
            value = row.get(key)
            if sys.stderr.isatty():
                if self._bar is None:
                    self._bar = tqdm(total=total, desc=self.stage, unit=axis, dynamic_ncols=True)
                self._bar.total = total
                self._bar.n = done
                if value is not None:
                    self._bar.set_postfix({key: f"{value:.4g}"}, refresh=False)
                self._bar.refresh()
            elif time.time() - self._last_log > 10 or (total and done >= total):
                self._last_log = time.time()
                pct = f" ({100 * done / total:.0f}%)" if total else ""
                log.info("%s: %s %s/%s%s %s=%s", self.stage, axis, done, total or "?", pct, key,
                         f"{value:.4g}" if isinstance(value, (int, float)) else value)
        if self.samples_path is not None and self.tracker is not None:
            rows = self._new_rows(self.samples_path)
            if rows:
                self.tracker.table(f"{self.stage}/samples", rows)
