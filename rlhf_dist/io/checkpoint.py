"""The standard checkpoint layout and atomic writes.

    save_dir/
      config.json               resolved config (secrets redacted)
      logs/run.log              unified run log
      sft/best_model/           HF causal LM (safetensors) + tokenizer
      sft/metrics.jsonl
      sft/stage_complete.json   written when the stage has finished (best_model is rewritten during it)
      reward_model/best_model/  HF sequence-classification model, num_labels=1
      reward_model/metrics.jsonl
      reward_model/stage_complete.json
      dpo/best_model/           HF causal LM + tokenizer (best held-out implicit-reward accuracy)
      dpo/metrics.jsonl
      dpo/stage_complete.json
      kto/best_model/           HF causal LM + tokenizer (best held-out implicit-reward accuracy), kto/metrics.jsonl, ...
      ppo/iteration_000NNN/     policy/, critic/ (HF), {policy,critic}_engine/ (optimizer states), state.json
      ppo/final_model/          the final policy (HF) and critic/
                                (lora_rank > 0: iteration policy/ and critic/ hold PEFT adapters; final_model
                                and every best_model are merged HF models, final_model/adapter/ the adapter)
      ppo/metrics.jsonl
      ray_train/{sft,reward,dpo,kto}/  Ray Train runs: checkpoints to resume each offline stage from (DeepSpeed states, RNG, loop state)

Every checkpoint directory is written to a temporary sibling, then `manifest.json` (sha256 of every
file) and the `COMPLETE` marker are written last, then it is renamed into place. A directory
without its marker is never resumed from.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterator

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
MARKER = "COMPLETE"
STAGE_DONE = "stage_complete.json"


class CheckpointError(RuntimeError):
    pass


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name not in (MANIFEST, MARKER))


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp directory; on success seal it (manifest, marker) and rename it to `final`."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        manifest = {str(p.relative_to(tmp)): {"sha256": sha256_file(p), "bytes": p.stat().st_size} for p in _files(tmp)}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
        with open(tmp / MARKER, "w") as f:
            f.write("ok\n")
            f.flush()
            os.fsync(f.fileno())
        old = None
        if final.exists():
            old = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(final, old)
        os.rename(tmp, final)
        _fsync_dir(final.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        os_error = e if isinstance(e, OSError) else getattr(e, "cause", None)  # also raised in a remote writer
        if isinstance(os_error, OSError):
            raise CheckpointError(f"could not write checkpoint {final}: {os_error.strerror or os_error} "
                                  f"(temporary files removed; the previous checkpoint is kept)") from e
        raise


def is_complete(path: str | os.PathLike) -> bool:
    p = Path(path)
    return (p / MARKER).is_file() and (p / MANIFEST).is_file()


def stage_finished(best_model: str | os.PathLike) -> bool:
    """An SFT or reward stage ran to its end: its best_model is complete and the stage marker beside it
    exists. A complete best_model alone may be the best of an interrupted run, saved mid-stage."""
    p = Path(best_model)
    return is_complete(p) and (p.parent / STAGE_DONE).is_file()


def mark_stage_finished(best_model: str | os.PathLike) -> None:
    """Written when an SFT or reward job has returned: from now on a rerun skips the stage."""
    p = Path(best_model)
    write_json_atomic(p.parent / STAGE_DONE, {"stage": p.parent.name, "best_model": p.name})


def mark_stage_started(best_model: str | os.PathLike) -> None:
    """Removes the marker when an SFT or reward job starts (again): if it then dies, its best_model may be
    a mid-run one, and a rerun must not skip the stage because of the marker of an earlier run."""
    (Path(best_model).parent / STAGE_DONE).unlink(missing_ok=True)


def warn_if_unfinished(best_model: str | os.PathLike, user: str) -> None:
    if is_complete(best_model) and not stage_finished(best_model):
        log.warning("%s: %s is the best model so far of a stage that has not finished; rerun that stage "
                    "(it resumes) to finish it", user, best_model)


def verify(path: str | os.PathLike, under: str | None = None) -> None:
    """Check the marker and every file's sha256 (only those below `under`, e.g. an iteration's policy/);
    raise CheckpointError naming the bad file."""
    p = Path(path)
    if not is_complete(p):
        raise CheckpointError(f"{p}: incomplete checkpoint (no {MARKER} marker)")
    manifest = json.loads((p / MANIFEST).read_text())
    for rel, meta in manifest.items():
        if under is not None and not rel.startswith(under.rstrip("/") + "/"):
            continue
        f = p / rel
        if not f.is_file():
            raise CheckpointError(f"{f}: listed in the manifest but missing")
        actual = sha256_file(f)
        if actual != meta["sha256"]:
            raise CheckpointError(f"{f}: sha256 mismatch: expected {meta['sha256']}, got {actual} "
                                  f"({f.stat().st_size} of {meta['bytes']} bytes)")


def complete_iterations(ppo_dir: str | os.PathLike) -> list[Path]:
    """Complete `iteration_NNNNNN` checkpoints, oldest first. Incomplete ones are reported, not used."""
    d = Path(ppo_dir)
    if not d.is_dir():
        return []
    out = []
    for p in sorted(d.glob("iteration_*")):
        if is_complete(p):
            out.append(p)
        else:
            log.warning("ignoring incomplete checkpoint %s (no %s marker)", p, MARKER)
    return out


def iterations_to_remove(complete: list[Path], keep: int | None, writing: Path | None = None) -> list[Path]:
    """Which of the complete iterations `complete` (oldest first) go so that the newest `keep` stay
    (save_total_limit; None = keep all). Never `writing` (a save in progress), never the newest."""
    if keep is None:
        return []
    return [p for p in complete[:max(0, len(complete) - keep)] if p != writing]


def prune_iterations(ppo_dir: str | os.PathLike, keep: int | None, writing: Path | None = None) -> list[Path]:
    """Delete the complete iterations beyond the newest `keep`, each logged. Each is renamed to a `.old-`
    name first, so a crash mid-delete leaves no half-deleted directory that still looks complete."""
    gone = iterations_to_remove(complete_iterations(ppo_dir), keep, writing)
    for p in gone:
        old = p.parent / f".{p.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(p, old)
        shutil.rmtree(old, ignore_errors=True)
        log.info("removed checkpoint %s (save_total_limit: %d)", p, keep)
    return gone


def write_json_atomic(path: str | os.PathLike, obj) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True))
    os.replace(tmp, path)


def remove_stale_temps(parent: str | os.PathLike) -> list[Path]:
    """Delete the temporary directories of saves that a crash interrupted (`.NAME.tmp-*`, `.NAME.old-*`)."""
    d = Path(parent)
    if not d.is_dir():
        return []
    stale = sorted(p for p in d.iterdir() if p.name.startswith(".") and (".tmp-" in p.name or ".old-" in p.name))
    for p in stale:
        log.warning("removing %s, left by an interrupted save", p)
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    return stale


def safe_join(root: str | os.PathLike, *parts: str) -> Path:
    """Join `parts` under `root`, refusing `..`, absolute parts and symlinks that leave `root`."""
    root_r = Path(root).resolve()
    for part in parts:
        if Path(part).is_absolute() or ".." in Path(part).parts:
            raise CheckpointError(f"path part {part!r} must be relative and must not contain '..'")
    out = Path(root, *parts)
    if not out.resolve().is_relative_to(root_r):
        raise CheckpointError(f"{out} resolves outside {root_r}")
    return out
