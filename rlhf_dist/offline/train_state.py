"""Ray Train checkpoints of the offline jobs (SFT, reward, DPO, KTO): DeepSpeed's state, each rank's RNG state and a
sha256 manifest, reported by every rank and verified before DeepSpeed's (unpickling) loader sees them."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from ..io.checkpoint import CheckpointError, sha256_file


def report_train_state(engine, state: dict, rank: int) -> None:
    """Report a Ray Train checkpoint every rank contributes to (a collective): DeepSpeed's weights and
    optimizer shards, this rank's torch RNG state, a sha256 manifest of this rank's files, and (rank 0)
    the loop state. Ray Train merges the ranks' files and registers the checkpoint once all have reported."""
    import ray.train  # deferred: loading ray takes seconds
    from ray.train import CheckpointUploadMode  # deferred: loading ray takes seconds
    from safetensors.torch import save_file  # deferred: loading safetensors takes seconds


    d = Path(tempfile.mkdtemp(prefix="rlhf-dist-ckpt-"))
    engine.save_checkpoint(str(d), tag="engine", client_state={})
    save_file({"torch": torch.get_rng_state()}, d / f"rng.rank{rank}.safetensors")
    if rank == 0:
        (d / "state.json").write_text(json.dumps(state))
    files = sorted(p for p in d.rglob("*") if p.is_file())
    manifest = {str(p.relative_to(d)): sha256_file(p) for p in files}
    (d / f"manifest.rank{rank}.json").write_text(json.dumps(manifest, indent=1))
    # Asynchronous: a synchronous report waits its turn with the controller (about 1.7 s a call here,
    # measured); the upload runs beside training and the local copy is deleted after it.
    ray.train.report({"step": state["step"], "epoch": state["epoch"]}, checkpoint=ray.train.Checkpoint.from_directory(d),
                     checkpoint_upload_mode=CheckpointUploadMode.ASYNC, delete_local_checkpoint_after_upload=True)


def load_train_state(engine, d: Path, rank: int, world: int) -> dict:
    """Verify every rank's manifest, then load the DeepSpeed state (its loader unpickles, so only files
    whose sha256 matches what this run wrote get to it) and this rank's RNG state."""
    from safetensors.torch import load_file  # deferred: loading safetensors takes seconds


    state = json.loads((d / "state.json").read_text())
    if state["world"] != world:
        raise CheckpointError(f"{d} was written by {state['world']} workers, this run has {world}; resume with "
                              f"the same number of workers, or delete {d.parent} to start the stage over")
    for r in range(world):
        m = d / f"manifest.rank{r}.json"
        if not m.is_file():
            raise CheckpointError(f"{d}: incomplete checkpoint, {m.name} is missing")
        for rel, digest in json.loads(m.read_text()).items():
            f = d / rel
            actual = sha256_file(f) if f.is_file() else "missing"
            if actual != digest:
                raise CheckpointError(f"{f}: sha256 mismatch: expected {digest}, got {actual}")
    engine.load_checkpoint(str(d), tag="engine")
    torch.set_rng_state(load_file(d / f"rng.rank{rank}.safetensors")["torch"])
    return state
