"""`rlhf-dist doctor`: prints the plan and fits it on a local Ray it starts (and stops); exit 3 when it cannot fit."""

from __future__ import annotations

import json

import pytest

from rlhf_dist.cli.doctor import EXIT_NO_FIT, doctor, fit_bundles, missing_resources
from rlhf_dist.config import load_config

pytestmark = pytest.mark.timeout(300)

ROLES = ("rollout", "policy", "critic", "reference", "reward")


def _config(**extra) -> dict:
    # No data paths and a model that does not exist: doctor must load nothing.
    cfg = {"model_name": "/nonexistent/model", "device": "cpu", "cluster": {"num_cpus": 2},
           "roles": {r: {"num_cpus": 0.3} for r in ROLES}}
    cfg.update(extra)
    return cfg


def test_fit_bundles_first_fit_and_strict_strategies():
    nodes = {"a": {"CPU": 2, "GPU": 1}, "b": {"CPU": 2, "x": 1}}
    assert fit_bundles([{"CPU": 1, "GPU": 1}, {"CPU": 1, "x": 1}, {"CPU": 1}], nodes) == ["a", "b", "a"]
    assert fit_bundles([{"CPU": 0.3}] * 6, nodes) == ["a"] * 6  # float sums: 6 x 0.3 <= 2
    assert fit_bundles([{"CPU": 1, "GPU": 1}, {"CPU": 1, "GPU": 1}], nodes) == ["a", None]
    assert fit_bundles([{"CPU": 1}, {"CPU": 1}], nodes, "STRICT_SPREAD") == ["a", "b"]
    assert fit_bundles([{"CPU": 1}] * 3, nodes, "STRICT_SPREAD") == ["a", "b", None]
    assert fit_bundles([{"CPU": 1}, {"CPU": 1, "x": 1}], nodes, "STRICT_PACK") == ["b", "b"]
    assert fit_bundles([{"CPU": 1, "GPU": 1}, {"CPU": 1, "x": 1}], nodes, "STRICT_PACK") == [None, None]
    assert "GPU (needs 8" in missing_resources({"CPU": 1, "GPU": 8}, nodes)
    assert "no single node" in missing_resources({"GPU": 1, "x": 1}, nodes)


def test_doctor_local_plan_fits(capsys):
    import ray

    before = ray.is_initialized()
    assert doctor(load_config(_config())) == 0
    out = capsys.readouterr().out
    for text in ("ray ", "torch ", "deepspeed ", "msgspec ", "nodes (1 alive of 1)", "bundle 4", "rollout-0",
                 "reward-0", "sft: 1 worker(s) x {CPU: 1}", "doctor: ok"):
        assert text in out, text
    assert "no node fits" not in out
    if not before:
        assert not ray.is_initialized(), "doctor left its local Ray running"


def test_local_ray_turns_the_preemption_watcher_off_while_it_runs(monkeypatch):
    """Ray Train reads the switch in the driver; the process is left as it was."""
    import os

    import ray

    from rlhf_dist.pipeline import PREEMPTION_WATCHER, ray_session

    assert not ray.is_initialized()  # else ray_session would only join it
    monkeypatch.delenv(PREEMPTION_WATCHER, raising=False)
    with ray_session(load_config(_config())):
        assert os.environ[PREEMPTION_WATCHER] == "0"
    assert PREEMPTION_WATCHER not in os.environ  # a user's own value is kept: the next test


def test_doctor_impossible_plan_names_role_and_resource(tmp_path, capsys, monkeypatch):
    """Through the CLI: a GPU that a CPU run does not have and a custom resource no node has -> exit 3."""
    import os

    import ray

    from rlhf_dist.cli.commands import main
    from rlhf_dist.pipeline import PREEMPTION_WATCHER

    monkeypatch.setenv(PREEMPTION_WATCHER, "1")  # the user's: the local Ray must leave it alone
    before = ray.is_initialized()
    path = tmp_path / "c.json"
    path.write_text(json.dumps(_config()))
    rc = main(["doctor", str(path), "roles.policy.num_gpus=8", "roles.critic.resources={no_such_node: 1}"])
    out, err = capsys.readouterr()
    assert rc == EXIT_NO_FIT, out + err
    assert "no node fits" in out
    fails = [line for line in err.splitlines() if line.startswith("doctor: FAIL")]
    assert any("policy-0" in f and "GPU (needs 8" in f for f in fails), err
    assert any("critic-0" in f and "no_such_node" in f for f in fails), err
    assert os.environ[PREEMPTION_WATCHER] == "1"
    if not before:
        assert not ray.is_initialized()


def test_bundle_overflow_names_the_role():
    """An actor asking more than its bundle holds would never start: doctor says which role."""
    from rlhf_dist.cli.doctor import bundle_overflow
    from rlhf_dist.roles.placement import Slot

    bundles = [{"CPU": 0.6}, {"CPU": 1, "GPU": 1}]
    slots = [Slot("policy", 0, 0, 0.3, 8.0, {}), Slot("reference", 0, 0, 0.3, 0.0, {}),
             Slot("critic", 0, 1, 1.0, 1.0, {"node_b": 1})]
    problems = bundle_overflow(bundles, slots)
    assert len(problems) == 2
    assert "policy-0 asks for {GPU: 8}" in problems[0] and "reference" not in problems[0]
    assert "critic-0 asks for {node_b: 1}" in problems[1]


def test_doctor_names_roles_that_would_share_a_gpu(capsys):
    """A Ray that declares 1 GPU (none needed to plan): a 2-worker policy at auto fractions and 2 SFT workers
    at half a GPU each are FAIL lines (NCCL refuses two ranks of one group on one device); roles at 0 GPU
    beside GPU roles get device cpu in the plan."""
    cfg = _config(device="cuda", cluster={"num_cpus": 2, "num_gpus": 1}, sft_workers=2, sft_batch_size=16,
                  train_gpus_per_worker=0.5, roles={**{r: {} for r in ROLES}, "policy": {"num_workers": 2}})
    assert doctor(load_config(cfg)) == EXIT_NO_FIT
    out, err = capsys.readouterr()
    fails = [line for line in err.splitlines() if line.startswith("doctor: FAIL")]
    assert any("roles.policy: 2 workers at" in f and "NCCL" in f for f in fails), err
    assert any(f.startswith("doctor: FAIL: sft stage: sft_workers 2 at train_gpus_per_worker 0.5") for f in fails), err
    assert "CPU (auto), " in out and "device cuda" in out, out
