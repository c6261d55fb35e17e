"""Placement: auto-sized roles, per-actor devices, NCCL's one-rank-per-GPU rule, and the pre-start check
that fails an impossible plan in seconds (pure functions first; then the pipeline on a local Ray)."""

from __future__ import annotations

import json
import time

import pytest

from rlhf_dist.config import load_config
from rlhf_dist.roles.placement import (
    describe_plan,
    fit_bundles,
    nccl_conflicts,
    placement_problems,
    plan_for_cluster,
    plan_placement,
)
from rlhf_dist.runtime.errors import PlacementError

pytestmark = pytest.mark.timeout(300)

ROLES = ("rollout", "policy", "critic", "reference", "reward")


def _cfg(roles: dict | None = None, **extra):
    return load_config({"model_name": "x", "device": "cpu", **({"roles": roles} if roles else {}), **extra})


def _cpus(slots) -> dict[str, float]:
    return {f"{s.role}-{s.rank}": s.num_cpus for s in slots}


def test_auto_cpus_split_the_cluster_and_keep_explicit_values():
    """The new user's case: no roles section, 2 CPUs, 5 roles -> 0.4 each, and it fits (and says so)."""
    cfg = _cfg()
    bundles, slots = plan_placement(cfg, 0, [2.0])
    assert set(_cpus(slots).values()) == {0.4}
    assert None not in fit_bundles(bundles, {"n": {"CPU": 2.0}})
    assert placement_problems(cfg, ("sft", "reward", "ppo"), "cpu", {"n": {"CPU": 2.0}}).errors == []
    assert all("0.4 CPU (auto)" in line and "device cpu" in line for line in describe_plan(cfg, bundles, slots))

    one = _cfg({"policy": {"num_cpus": 1}})  # explicit: kept as given, the rest split what is left
    bundles, slots = plan_placement(one, 0, [2.0])
    assert _cpus(slots) == {"rollout-0": 0.25, "policy-0": 1.0, "critic-0": 0.25, "reference-0": 0.25,
                            "reward-0": 0.25}
    assert "policy-0: 1 CPU, " in describe_plan(one, bundles, slots)[1]
    assert set(_cpus(plan_placement(cfg, 0, [64.0])[1]).values()) == {8.0}  # capped
    assert set(_cpus(plan_placement(cfg, 0, [3.0])[1]).values()) == {0.6}  # rounded down to 0.01
    assert set(_cpus(plan_placement(cfg, 0)[1]).values()) == {1.0}  # cluster unknown
    # conftest's explicit 0.4 per role stays as given
    assert set(_cpus(plan_placement(_cfg({r: {"num_cpus": 0.4} for r in ROLES}), 0, [16.0])[1]).values()) == {0.4}


def test_auto_cpus_pack_whole_actors_into_nodes():
    """Two nodes of 3 CPUs: an even 1.2 fits only 4 actors (2 per node); 1.0 fits all 5."""
    cfg = _cfg()
    bundles, slots = plan_placement(cfg, 0, [3.0, 3.0])
    assert set(_cpus(slots).values()) == {1.0}
    assert None not in fit_bundles(bundles, {"a": {"CPU": 3.0}, "b": {"CPU": 3.0}})
    # too many actors for the floor: the plan fails the check, naming the role and CPU
    many = _cfg({"rollout": {"num_workers": 26}})
    assert set(_cpus(plan_placement(many, 0, [2.0])[1]).values()) == {0.1}
    errors = placement_problems(many, ("ppo",), "cpu", {"n": {"CPU": 2.0}}).errors
    assert errors and "cannot be placed: missing CPU" in errors[0]


def test_auto_gpus_fill_whole_gpus():
    """All roles at 0 GPUs: 1/k of a GPU per bundle with k * GPUs >= bundles (5 on 2 GPUs -> 1/3, not 1/2)."""
    nodes = {"a": {"CPU": 16.0, "GPU": 1.0}, "b": {"CPU": 16.0, "GPU": 1.0}}
    bundles, slots = plan_for_cluster(_cfg(), "cuda", nodes)
    assert [s.num_gpus for s in slots] == [pytest.approx(1 / 3)] * 5
    assert None not in fit_bundles(bundles, nodes)
    bundles, _ = plan_for_cluster(_cfg({"colocate": True}), "cuda", nodes)  # 3 bundles on 2 GPUs
    assert [b["GPU"] for b in bundles] == [0.5, 0.5, 0.5]


def test_each_slot_gets_its_device():
    """cuda only for an actor with a GPU share on a CUDA run; a 0-GPU role beside GPU roles runs on the CPU."""
    cfg = _cfg({"policy": {"num_gpus": 1}, "critic": {"num_gpus": 1}})
    _, slots = plan_placement(cfg, 2, [16.0], "cuda")
    assert {s.role: s.device for s in slots} == {"rollout": "cpu", "policy": "cuda", "critic": "cuda",
                                                 "reference": "cpu", "reward": "cpu"}
    _, slots = plan_placement(_cfg(), 1, [16.0], "cuda")  # auto fractions: everyone on the GPU
    assert {s.device for s in slots} == {"cuda"}
    _, slots = plan_placement(cfg, 0, [16.0], "cpu")  # a CPU run stays on the CPU
    assert {s.device for s in slots} == {"cpu"}
    colo = _cfg({"policy": {"num_gpus": 1}, "colocate": True})  # reference shares policy's GPU
    _, slots = plan_placement(colo, 1, [16.0], "cuda")
    assert {s.role: (s.device, s.num_gpus) for s in slots if s.role in ("policy", "reference")} == {
        "policy": ("cuda", 0.5), "reference": ("cuda", 0.5)}


def test_nccl_refuses_ranks_of_one_group_on_one_gpu():
    nodes = {"a": {"CPU": 16.0, "GPU": 1.0}}
    cfg = _cfg({"policy": {"num_workers": 2}})  # auto: 6 actors at 1/6 GPU on one GPU
    errors = placement_problems(cfg, ("ppo",), "cuda", nodes).errors
    assert len(errors) == 1 and errors[0].startswith("roles.policy: 2 workers at 0.166667 GPU each (auto")
    assert "NCCL refuses" in errors[0] and "roles.policy.num_gpus: 1" in errors[0]
    assert placement_problems(cfg, ("ppo",), "cpu", nodes).errors == []  # gloo on CPU: no such rule

    whole = _cfg({"policy": {"num_workers": 2, "num_gpus": 1}, "colocate": True})  # own GPUs, shared with reference
    b, s = plan_placement(whole, 2, [16.0], "cuda")
    assert nccl_conflicts(whole, b, s, "cuda", ("ppo",)) == []
    half = _cfg({"critic": {"num_workers": 2, "num_gpus": 0.5}}, ppo_micro_batch_size=4)
    b, s = plan_placement(half, 1, [16.0], "cuda")
    assert [e.split(":")[0] for e in nccl_conflicts(half, b, s, "cuda", ("ppo",))] == ["roles.critic"]

    train = _cfg(sft_workers=2, train_gpus_per_worker=0.5)
    errors = nccl_conflicts(train, [], [], "cuda", ("sft", "reward"))
    assert errors == [e for e in errors if e.startswith("sft stage: sft_workers 2 at train_gpus_per_worker 0.5")]
    assert len(errors) == 1 and "train_gpus_per_worker: 1" in errors[0]


def test_busy_cluster_warns_but_an_impossible_plan_is_an_error():
    cfg = _cfg({r: {"num_cpus": 0.4} for r in ROLES})
    total, busy = {"n": {"CPU": 2.0}}, {"n": {"CPU": 0.5}}
    check = placement_problems(cfg, ("sft", "ppo"), "cpu", total, busy)
    assert check.errors == [] and check.warnings  # PPO's bundles beyond the free 0.5 CPU, and the SFT worker
    assert "role rollout-0" not in check.warnings[0] and "role policy-0" in check.warnings[0]
    assert check.warnings[-1].startswith("sft stage: 1 Ray Train worker(s) x {CPU: 1} cannot be placed")
    big = _cfg({"policy": {"num_cpus": 64}})
    check = placement_problems(big, ("ppo",), "cpu", total, busy)
    assert len(check.errors) == 1 and "policy-0" in check.errors[0] and "CPU (needs 64" in check.errors[0]
    assert check.warnings == []


# ---------------------------------------------------------------------------------------
# The pre-start check on a real (local) Ray
# ---------------------------------------------------------------------------------------

def _no_stage(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("a stage started")

    monkeypatch.setattr("rlhf_dist.offline.job.run_supervised", boom)
    monkeypatch.setattr("rlhf_dist.online.driver.run_ppo", boom)


def test_pipeline_refuses_duplicate_gpu_before_any_stage(tiny, tmp_path, monkeypatch):
    """A local Ray that declares one GPU (none needed to check): a 2-worker policy at auto fractions."""
    import ray
    from conftest import base_config

    from rlhf_dist.pipeline import create_rlhf_pipeline

    assert not ray.is_initialized()
    _no_stage(monkeypatch)
    cfg = base_config(tiny, tmp_path / "run", device="cuda", cluster={"num_cpus": 2, "num_gpus": 1},
                      roles={"policy": {"num_workers": 2}})
    pipe = create_rlhf_pipeline(cfg)
    with pytest.raises(PlacementError, match=r"roles\.policy: 2 workers at .* NCCL refuses"):
        pipe.run_ppo_training()
    assert not ray.is_initialized()


def test_pipeline_impossible_plan_fails_in_seconds(local_ray, tiny, tmp_path, monkeypatch):
    """roles.policy.num_cpus: 64 on a 2-CPU Ray: PlacementError naming the role and CPU, before SFT starts."""
    from conftest import base_config

    from rlhf_dist.pipeline import create_rlhf_pipeline

    _no_stage(monkeypatch)
    cfg = base_config(tiny, tmp_path / "run")
    cfg["roles"] = {"policy": {"num_cpus": 64}}  # the others left at auto
    pipe = create_rlhf_pipeline(cfg)
    t = time.time()
    with pytest.raises(PlacementError) as e:
        pipe.run_full_pipeline()
    assert time.time() - t < 30
    assert "role policy-0" in str(e.value) and "CPU (needs 64" in str(e.value)
    assert not (tmp_path / "run" / "sft").exists()


def test_cli_run_with_a_resource_nobody_has_exits_3(local_ray, tiny, tmp_path, monkeypatch, capsys):
    from conftest import base_config

    from rlhf_dist.cli.commands import main

    _no_stage(monkeypatch)
    path = tmp_path / "c.json"
    path.write_text(json.dumps(base_config(tiny, tmp_path / "run")))
    rc = main(["run", str(path), "roles.critic.resources={no_such_node: 1}"])
    err = capsys.readouterr().err
    assert rc == 3, err
    assert "critic-0" in err and "no_such_node" in err, err
