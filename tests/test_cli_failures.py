"""An internal failure prints one line on stderr (role, phase, cause, run log) and exits with its kind's code;
the traceback goes to save_dir/logs/run.log only. The stage runs for real up to the failing call (config,
data checks, logging, progress monitor); only Ray and the stage's work are replaced."""

from __future__ import annotations

import contextlib
import json

import pytest
from conftest import base_config
from torch.distributed import DistBackendError

from rlhf_dist import cli, pipeline
from rlhf_dist.cli.failures import EXIT, classify
from rlhf_dist.offline import job as stages
from rlhf_dist.online import driver as ppo
from rlhf_dist.runtime.errors import PhaseTimeout, PlacementError, RoleFailure

pytestmark = pytest.mark.usefixtures("drop_log_handlers")

# What NCCL says when two ranks share a GPU: the useful part is on the last line.
NCCL = ("NCCL error in: ../torch/csrc/distributed/c10d/NCCLUtils.hpp:275, invalid usage (run with NCCL_DEBUG=WARN "
        "for details), NCCL version 2.20.5\nncclInvalidUsage: This usually reflects invalid usage of NCCL library.\n"
        "Last error:\nDuplicate GPU detected : rank 1 and rank 0 both on CUDA device 1a000")


def remote_failure(role: str, phase: str, cause: BaseException) -> RoleFailure:
    """As runtime.wait words a remote call that raised."""
    return RoleFailure(f"{role}: phase '{phase}' failed: {cause!r}", cause=cause)


@pytest.fixture
def config(tiny, tmp_path, monkeypatch):
    """A config file for a run whose stages start for real but on no Ray; WARNING keeps stderr to failures."""
    monkeypatch.setattr(pipeline, "ray_session", lambda cfg: contextlib.nullcontext())
    monkeypatch.setattr(pipeline.RLHFPipeline, "_device", lambda self: "cpu")
    monkeypatch.setattr(pipeline.RLHFPipeline, "_preflight", lambda self, stages: "cpu")  # asks Ray about the cluster
    path = tmp_path / "run.json"
    path.write_text(json.dumps(base_config(tiny, tmp_path / "out", log_level="WARNING")))
    return path


def fail_with(monkeypatch, module, name, exc):
    def raise_it(*args, **kwargs):
        raise exc
    monkeypatch.setattr(module, name, raise_it)


def run_failing(capsys, config, command="ppo"):
    code = cli.main([command, str(config)])
    err = capsys.readouterr().err
    log = config.parent / "out" / "logs" / "run.log"
    return code, err, log.read_text(encoding="utf-8")


@pytest.mark.parametrize("exc, kind, words", [
    (RoleFailure("policy: actor died during phase 'learner': RayActorError", died=True), "role",
     ["policy: actor died during phase 'learner': RayActorError"]),
    (remote_failure("rollout", "sync", ValueError("bad shape")), "role",
     ["rollout: phase 'sync' failed: ValueError: bad shape"]),
    (PhaseTimeout("reward: phase 'experience' timed out after 10s"), "timeout",
     ["reward: phase 'experience' timed out after 10s"]),
    (remote_failure("policy", "learner", DistBackendError(NCCL)), "collective",
     ["policy: phase 'learner' failed: DistBackendError: NCCL error in:",
      "Duplicate GPU detected : rank 1 and rank 0 both on CUDA device 1a000"]),
    (remote_failure("rollout", "sync", RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] "
                                                    "Connection closed by peer [127.0.0.1]:4242")), "collective",
     ["rollout: phase 'sync' failed: RuntimeError:", "Connection closed by peer"]),
    (PlacementError("critic: needs GPU 1, the cluster has GPU 0"), "placement",
     ["critic: needs GPU 1, the cluster has GPU 0"]),
    (ValueError("boom"), "internal", ["driver: phase 'ppo' failed: ValueError: boom"]),
], ids=["role-died", "role-raised", "timeout", "nccl", "gloo", "placement", "bug"])
def test_ppo_failure_is_one_line_with_traceback_in_run_log(capsys, monkeypatch, config, exc, kind, words):
    fail_with(monkeypatch, ppo, "run_ppo", exc)
    code, err, log = run_failing(capsys, config)
    assert code == EXIT[kind]
    assert err.count("\n") == 1 and err.startswith("rlhf-dist: failed: "), err
    for w in words:
        assert w in err
    assert f"(exit {code}, " in err and f"traceback in {config.parent / 'out' / 'logs' / 'run.log'})" in err
    assert "Traceback" not in err
    assert "Traceback (most recent call last)" in log and "raise_it" in log and f"exit {code}" in log


def test_learner_lost_after_nccl_error_is_a_collective_error():
    """The chain ppo.run_ppo builds when a learner died of an NCCL error and restarts ran out."""
    try:
        try:
            try:
                raise remote_failure("policy", "learner", DistBackendError(NCCL))
            except RoleFailure as e:
                raise ppo.LearnerLost("policy-0 died during phase 'learner'") from e
        except ppo.LearnerLost as e:
            raise RoleFailure(f"{e}; gave up after 2 learner restarts (max_learner_restarts)") from e
    except RoleFailure as e:
        assert classify(e) == "collective"
    assert classify(RoleFailure("policy-0 died; gave up")) == "role"


def test_resume_from_a_corrupt_iteration_checkpoint_is_refused(capsys, monkeypatch, config, tiny):
    """A resume verifies the iteration it resumes from against its manifest: one flipped byte in its policy
    weights (which would still load) is a user error naming the file, before any role starts."""
    import shutil

    from rlhf_dist.io.checkpoint import atomic_dir

    cfg = json.loads(config.read_text())
    config.write_text(json.dumps({**cfg, "reward_fn": "rlhf_dist.demo:positivity_reward", "reward_model_weight": 0.0}))
    ckpt = config.parent / "out" / "ppo" / "iteration_000002"
    with atomic_dir(ckpt) as tmp:
        for role in ("policy", "critic"):
            shutil.copytree(tiny["model"], tmp / role)
        (tmp / "state.json").write_text(json.dumps({"iteration": 2, "cursor": 32, "version": 2, "algorithm": "ppo",
                                                    "kl_ctl": {"value": 0.05}}))
    weights = ckpt / "policy" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # the last byte of the last tensor: the file still loads, with one wrong weight
    weights.write_bytes(bytes(data))
    fail_with(monkeypatch, ppo, "start_roles", AssertionError("roles started from an unverified checkpoint"))
    code, err, _ = run_failing(capsys, config)
    assert code == EXIT["user"]
    assert err.startswith("rlhf-dist: error: ") and f"{weights}: sha256 mismatch" in err, err


@pytest.mark.parametrize("failure, kind, words", [
    (RuntimeError("CUDA out of memory"), "train", ["sft-worker-1: phase 'train' failed: RuntimeError: CUDA out"]),
    (DistBackendError(NCCL), "collective", ["sft-worker-1: phase 'train' failed: DistBackendError:",
                                            "Duplicate GPU detected"]),
], ids=["worker-raised", "worker-nccl"])
def test_ray_train_failure_names_the_worker(capsys, monkeypatch, config, failure, kind, words):
    from ray.train import WorkerGroupError  # what TorchTrainer.fit raises when a worker fails (Ray Train v2)

    exc = WorkerGroupError(f"[Rank 1 Error Snippet]:\n{failure}", {1: failure})
    fail_with(monkeypatch, stages, "run_supervised", exc)
    code, err, log = run_failing(capsys, config, "sft")
    assert code == EXIT[kind]
    assert err.count("\n") == 1
    for w in words:
        assert w in err
    assert "Training failed due to worker errors" in log


def test_ray_train_controller_failure(capsys, monkeypatch, config):
    from ray.train import ControllerError

    fail_with(monkeypatch, stages, "run_supervised", ControllerError(TimeoutError("worker group did not start")))
    code, err, _ = run_failing(capsys, config, "sft")
    assert code == EXIT["train"] == 7
    assert "sft-worker: phase 'train' failed: TimeoutError: worker group did not start" in err


def test_failure_before_config_says_there_is_no_run_log(capsys, monkeypatch, tmp_path):
    import rlhf_dist.cli.commands

    fail_with(monkeypatch, rlhf_dist.cli.commands, "build_tiny", OSError("disk on fire"))
    code = cli.main(["init-tiny", str(tmp_path / "t")])
    err = capsys.readouterr().err
    assert code == EXIT["internal"] == 70
    assert err == ("rlhf-dist: failed: driver: phase 'init-tiny' failed: OSError: disk on fire "
                   "(exit 70, internal error, please report it; no run log: it failed before the config was loaded)\n")


def test_exit_codes_are_distinct_and_placement_matches_doctor():
    from rlhf_dist.cli.doctor import EXIT_NO_FIT

    assert EXIT["placement"] == EXIT_NO_FIT
    assert len(set(EXIT.values())) == len(EXIT)
