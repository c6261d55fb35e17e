"""W&B tracking with real wandb in offline mode, read back from the run's own files."""

import json
import struct
import time

from rlhf_dist.config import load_config
from rlhf_dist.tracking import StageMonitor, Tracker, wandb_mode

CANARY = "canary-key-5f3e9a1b7c"


def read_wandb_records(path):
    """Records of a .wandb file: a 7-byte header, then LevelDB-log-framed protobuf records in 32 KiB blocks."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = open(path, "rb").read()
    assert data[:4] == b":W&B"
    pos, block, out, buf = 7, 32768, [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk = data[pos + 7: pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            continue
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):
            r = pb.Record()
            r.ParseFromString(buf)
            out.append(r)
            buf = b""
    return out


def write_rows(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def test_mode_auto(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))  # no netrc
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert wandb_mode("auto") == "offline"
    monkeypatch.setenv("WANDB_API_KEY", CANARY)
    assert wandb_mode("auto") == "online"
    assert wandb_mode("disabled") == "disabled"


def test_offline_run_has_every_stage_and_no_secret(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", CANARY)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    save = tmp_path / "run"
    save.mkdir()
    cfg = load_config({"model_name": "m", "save_dir": str(save), "wandb": {"mode": "offline", "tags": ["t"]}})
    tracker = Tracker(cfg, save)
    for stage, sub, rows in (
        ("sft", "sft", [{"step": i, "loss": 3.0 - i, "total_steps": 3} for i in (1, 2, 3)]),
        ("reward", "reward_model", [{"step": i, "accuracy": 0.5 + 0.1 * i} for i in (1, 2)]),
        ("ppo", "ppo", [{"iteration": i, "reward_mean": 0.1 * i, "kl": 0.01 * i} for i in (1, 2)]),
    ):
        samples = save / "ppo" / "samples.jsonl" if stage == "ppo" else None
        with StageMonitor(stage, save / sub / "metrics.jsonl", tracker, samples_path=samples, interval=0.05):
            write_rows(save / sub / "metrics.jsonl", rows)
            if samples:
                write_rows(samples, [{"iteration": 1, "prompt": "p", "response": "r", "reward": 1.0, "kl": 0.1}])
    run_id = (save / "wandb_run_id").read_text()
    tracker.finish()

    files = list((save / "wandb").rglob("*.wandb"))
    assert len(files) == 1 and run_id in files[0].name
    want = {"sft/loss", "sft/step", "reward/accuracy", "ppo/reward_mean", "ppo/kl", "ppo/iteration",
            "ppo/samples"}  # ppo/samples: the table of generations
    # W&B's service may still be writing the file when finish() returns (seen once in a loaded suite run
    # with wandb 0.31: no history records yet), so read until the history is there.
    deadline = time.time() + 30
    while True:
        records = read_wandb_records(files[0])
        keys = {item.key or item.nested_key[0] for r in records if r.HasField("history") for item in r.history.item}
        if want <= keys or time.time() > deadline:
            break
        time.sleep(0.5)
    assert want <= keys, (keys, [r.WhichOneof("record_type") for r in records])
    for f in save.rglob("*"):
        if f.is_file():
            assert CANARY.encode() not in f.read_bytes(), f

    # Resuming continues the same run id.
    again = Tracker(cfg, save)
    assert again.run.id == run_id
    again.finish()
