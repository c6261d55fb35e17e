"""`rlhf-dist doctor CONFIG`: the environment, the Ray cluster and the PPO placement plan, before anything runs.

Nothing is loaded (no model, no data): it answers "will this config be placed on this cluster, and where?"
in seconds, instead of a placement-group timeout minutes into a run. Exit 0 = every bundle fits;
3 = something cannot be placed (the message names the role and the missing resource).
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import platform
import sys

import torch

from ..config import RLHFConfig
from ..config.stages import STAGES
from ..models.load import ModelError, resolve_device
from ..pipeline import ray_session

# The pure helpers live in placement.py (shared with the pipeline's pre-start check); importable from here too.
from ..roles.placement import (  # noqa: F401
    PlacementCheck,
    bundle_overflow,
    cluster_nodes,
    describe_plan,
    fit_bundles,
    missing_resources,
    placement_problems,
    train_bundle,
)
from ..roles.placement import fmt_res as _fmt_res

log = logging.getLogger(__name__)

EXIT_NO_FIT = 3
_PACKAGES = ("torch", "ray", "deepspeed", "transformers", "msgspec")


# ---------------------------------------------------------------------------------------

def _versions() -> None:
    print(f"python       {platform.python_version()} ({sys.executable})")
    for name in _PACKAGES:
        try:  # metadata only: importing deepspeed would take seconds and probe the accelerator
            v = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            v = "NOT INSTALLED"
        print(f"{name:<12} {v}")

    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        print(f"cuda         available, {len(names)} device(s): {', '.join(names)} (torch built for CUDA {torch.version.cuda})")
    else:
        print(f"cuda         not available here (torch CUDA build: {torch.version.cuda or 'none'})")


def _node_table() -> tuple[dict[str, dict], dict[str, dict], dict[str, str]]:
    """Print the nodes; return {node_id: total}, {node_id: free} resources of the alive ones, and {node_id: ip}."""
    import ray  # deferred: loading ray takes seconds

    nodes = ray.nodes()
    total, free = cluster_nodes()
    ips: dict[str, str] = {}
    print(f"nodes ({sum(n['Alive'] for n in nodes)} alive of {len(nodes)}):")
    for n in nodes:
        nid = n["NodeID"]
        ips[nid] = n.get("NodeManagerAddress", "?")
        head = " head" if "node:__internal_head__" in n.get("Resources", {}) else ""
        print(f"  {nid[:12]}  {ips[nid]:<15} {'alive' if n['Alive'] else 'DEAD '}{head}  total {_fmt_res(n['Resources'])}")
        if nid in free and free[nid] != total[nid]:
            print(f"  {'':12}  {'':<15}       free  {_fmt_res(free[nid])}")
    return total, free, ips


def _where(node: str | None, ips: dict[str, str]) -> str:
    return f"node {node[:12]} ({ips.get(node, '?')})" if node else "no node fits"


def _cluster_header(cfg: RLHFConfig) -> None:
    """Print the Ray address and the cluster's total and free resources."""
    import ray  # deferred: loading ray takes seconds

    address = cfg.cluster.address or os.environ.get("RAY_ADDRESS")
    print(f"address: {address}" if address else f"address: none: a local Ray on {cfg.cluster.bind_host}")
    print(f"resources: total {_fmt_res(ray.cluster_resources())}")
    print(f"           free  {_fmt_res(ray.available_resources())}")


def _plan_device(cfg: RLHFConfig, total: dict[str, dict], problems: list[str]) -> str:
    """Print and return the device to plan for; a device the cluster cannot give is added to problems."""
    print("\n== device")
    try:  # judged by the cluster's GPUs, as the pipeline does
        device = resolve_device(cfg.device, sum(r.get("GPU", 0) for r in total.values()))
        print(f"device: {cfg.device} -> {device}")
    except ModelError as e:
        device = cfg.device  # plan what the config asks for, and report that the cluster cannot run it
        problems.append(str(e))
        print(f"device: {cfg.device} -> ERROR: {e}")
    return device


def _print_ppo_plan(cfg: RLHFConfig, check: PlacementCheck, device: str, total: dict[str, dict],
                    ips: dict[str, str]) -> None:
    """Print each PPO bundle with its roles and the node it fits on, their sum, and each role's share."""
    print(f"\n== PPO placement (strategy {cfg.roles.strategy}, colocate {cfg.roles.colocate}, device {device})")
    hosts = fit_bundles(check.bundles, total, cfg.roles.strategy)
    for i, (bundle, host) in enumerate(zip(check.bundles, hosts)):
        names = " + ".join(f"{s.role}-{s.rank}" for s in check.slots if s.bundle == i)
        print(f"  bundle {i}: {_fmt_res(bundle):<40} {names:<28} -> {_where(host, ips)}")
    need: dict[str, float] = {}
    for b in check.bundles:
        for k, v in b.items():
            need[k] = need.get(k, 0.0) + v
    print(f"  total: {_fmt_res(need)}")
    for line in describe_plan(cfg, check.bundles, check.slots):
        print(f"  {line}")


def _print_train_plan(cfg: RLHFConfig, stages: tuple[str, ...], device: str, total: dict[str, dict],
                      ips: dict[str, str]) -> None:
    """Print where each non-PPO stage's Ray Train workers would go."""
    print("\n== SFT / reward model / DPO (Ray Train workers; run before PPO, each stage on its own)")
    train = train_bundle(cfg, device)
    for stage in (s for s in stages if STAGES[s].offline):
        n = getattr(cfg, STAGES[stage].fields.workers)
        hosts = fit_bundles([train] * n, total)
        print(f"  {stage}: {n} worker(s) x {_fmt_res(train)} -> {', '.join(_where(h, ips) for h in hosts)}")


def _verdict(warnings: list[str], problems: list[str]) -> int:
    """Print the warnings and problems (stderr) or the all-clear; return the exit code."""
    print()
    for w in warnings:
        print(f"doctor: WARN: not free now (another job holds it; a run would wait up to setup_timeout_s): {w}",
              file=sys.stderr)
    if problems:
        for p in problems:
            print(f"doctor: FAIL: {p}", file=sys.stderr)
        return EXIT_NO_FIT
    print("doctor: ok: every bundle and Ray Train worker fits the cluster")
    return 0


def doctor(cfg: RLHFConfig) -> int:
    problems: list[str] = []
    print("== versions")
    _versions()

    with ray_session(cfg):
        print("\n== ray cluster")
        _cluster_header(cfg)
        total, free, ips = _node_table()
        device = _plan_device(cfg, total, problems)
        stages = cfg.run_stages()
        # The same check as the pipeline's before a stage starts: totals decide, busy resources only warn.
        check = placement_problems(cfg, stages, device, total, free)
        problems += check.errors
        _print_ppo_plan(cfg, check, device, total, ips)
        _print_train_plan(cfg, stages, device, total, ips)
    return _verdict(check.warnings, problems)
