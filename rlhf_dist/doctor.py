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

from .config import RLHFConfig

log = logging.getLogger(__name__)

EXIT_NO_FIT = 3
_EPS = 1e-9  # resource amounts are floats (0.3 CPU, 0.25 GPU): compare with a tolerance
_PACKAGES = ("torch", "ray", "deepspeed", "transformers", "msgspec")


# ---------------------------------------------------------------------------------------
# Pure helpers (unit-tested without Ray)
# ---------------------------------------------------------------------------------------

def _fits(need: dict, avail: dict) -> bool:
    return all(avail.get(k, 0.0) + _EPS >= v for k, v in need.items() if v > 0)


def _take(need: dict, avail: dict) -> None:
    for k, v in need.items():
        avail[k] = avail.get(k, 0.0) - v


def fit_bundles(bundles: list[dict], nodes: dict[str, dict], strategy: str = "PACK") -> list[str | None]:
    """First-fit of `bundles` over {node_id: available resources}; the node per bundle, None where none fits.

    A rough model of Ray's scheduler: PACK and SPREAD are soft in Ray, so any placement counts;
    STRICT_PACK needs one node for all bundles, STRICT_SPREAD a different node per bundle.
    """
    free = {n: dict(r) for n, r in nodes.items()}
    if strategy == "STRICT_PACK":
        total: dict[str, float] = {}
        for b in bundles:
            for k, v in b.items():
                total[k] = total.get(k, 0.0) + v
        host = next((n for n, r in free.items() if _fits(total, r)), None)
        return [host] * len(bundles)
    out: list[str | None] = []
    used: set[str] = set()
    for b in bundles:
        host = next((n for n, r in free.items()
                     if _fits(b, r) and not (strategy == "STRICT_SPREAD" and n in used)), None)
        if host is not None:
            _take(b, free[host])
            used.add(host)
        out.append(host)
    return out


def missing_resources(need: dict, nodes: dict[str, dict]) -> str:
    """Why `need` fits no node: the resources no single node has enough of."""
    short = []
    for k, v in need.items():
        most = max((r.get(k, 0.0) for r in nodes.values()), default=0.0)
        if most + _EPS < v:
            short.append(f"{k} (needs {_num(v)}, most free on one node: {_num(most)})")
    if short:
        return "missing " + ", ".join(short)
    return "each resource exists somewhere, but no single node has all of them free at once"


def bundle_overflow(bundles: list[dict], slots) -> list[str]:
    """Bundles whose actors ask for more than the bundle holds: such an actor would never start."""
    out = []
    for b, bundle in enumerate(bundles):
        members = [s for s in slots if s.bundle == b]
        asks: dict[str, float] = {}
        for s in members:
            for k, v in {"CPU": s.num_cpus, "GPU": s.num_gpus, **s.resources}.items():
                asks[k] = asks.get(k, 0.0) + v
        over = {k: v for k, v in asks.items() if v > bundle.get(k, 0.0) + _EPS}
        if over:
            askers = [s for s in members if any({"CPU": s.num_cpus, "GPU": s.num_gpus, **s.resources}.get(k)
                                                for k in over)]
            names = " + ".join(f"{s.role}-{s.rank}" for s in askers)
            out.append(f"role {names} asks for {_fmt_res(over)} in all but bundle {b} holds only {_fmt_res(bundle)}: "
                       "the actor could never start (the placement plan is inconsistent)")
    return out


def _num(v: float) -> str:
    return f"{v:g}"


def _fmt_res(res: dict) -> str:
    """Resources for humans: hide Ray's per-node markers, bytes in GiB."""
    parts = []
    for k in sorted(res):
        if k.startswith("node:"):
            continue
        v = res[k]
        parts.append(f"{k}: {v / 2**30:.1f}GiB" if k in ("memory", "object_store_memory") else f"{k}: {_num(v)}")
    return "{" + ", ".join(parts) + "}"


# ---------------------------------------------------------------------------------------

def _versions() -> None:
    print(f"python       {platform.python_version()} ({sys.executable})")
    for name in _PACKAGES:
        try:  # metadata only: importing deepspeed would take seconds and probe the accelerator
            v = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            v = "NOT INSTALLED"
        print(f"{name:<12} {v}")
    import torch

    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        print(f"cuda         available, {len(names)} device(s): {', '.join(names)} (torch built for CUDA {torch.version.cuda})")
    else:
        print(f"cuda         not available here (torch CUDA build: {torch.version.cuda or 'none'})")


def _node_table() -> tuple[dict[str, dict], dict[str, str]]:
    """Print the nodes; return {node_id: available resources} of the alive ones and {node_id: ip}."""
    import ray

    nodes = ray.nodes()
    try:  # per-node *available* resources (a running job's actors count); DeveloperAPI, so fall back to totals
        from ray._private.state import available_resources_per_node

        avail = available_resources_per_node()
    except Exception as e:  # noqa: BLE001 - any failure: totals are still a useful answer
        log.debug("available_resources_per_node failed (%s); using totals", e)
        avail = {}
    alive: dict[str, dict] = {}
    ips: dict[str, str] = {}
    print(f"nodes ({sum(n['Alive'] for n in nodes)} alive of {len(nodes)}):")
    for n in nodes:
        nid = n["NodeID"]
        ips[nid] = n.get("NodeManagerAddress", "?")
        head = " head" if "node:__internal_head__" in n.get("Resources", {}) else ""
        print(f"  {nid[:12]}  {ips[nid]:<15} {'alive' if n['Alive'] else 'DEAD '}{head}  total {_fmt_res(n['Resources'])}")
        if n["Alive"]:
            alive[nid] = dict(avail.get(nid, n["Resources"]))
            if nid in avail:
                print(f"  {'':12}  {'':<15}       free  {_fmt_res(alive[nid])}")
    return alive, ips


def doctor(cfg: RLHFConfig) -> int:
    import ray

    from .models import ModelError, resolve_device
    from .pipeline import ray_session
    from .runtime import plan_placement

    problems: list[str] = []
    print("== versions")
    _versions()

    with ray_session(cfg):
        print("\n== ray cluster")
        address = cfg.cluster.address or os.environ.get("RAY_ADDRESS")
        print(f"address: {address}" if address else f"address: none: a local Ray on {cfg.cluster.bind_host}")
        total = ray.cluster_resources()
        print(f"resources: total {_fmt_res(total)}")
        print(f"           free  {_fmt_res(ray.available_resources())}")
        nodes, ips = _node_table()
        print("\n== device")
        try:  # judged by the cluster's GPUs, as the pipeline does
            device = resolve_device(cfg.device, total.get("GPU", 0))
            print(f"device: {cfg.device} -> {device}")
        except ModelError as e:
            device = cfg.device  # plan what the config asks for, and report that the cluster cannot run it
            problems.append(str(e))
            print(f"device: {cfg.device} -> ERROR: {e}")
        gpus = int(total.get("GPU", 0)) if device == "cuda" else 0  # as ppo.start_roles computes it

        def where(node: str | None) -> str:
            return f"node {node[:12]} ({ips.get(node, '?')})" if node else "no node fits"

        print(f"\n== PPO placement (strategy {cfg.roles.strategy}, colocate {cfg.roles.colocate}, "
              f"{gpus} GPU(s) for planning)")
        bundles, slots = plan_placement(cfg, gpus)
        problems += bundle_overflow(bundles, slots)
        hosts = fit_bundles(bundles, nodes, cfg.roles.strategy)
        free = {n: dict(r) for n, r in nodes.items()}
        for i, (bundle, host) in enumerate(zip(bundles, hosts)):
            members = [s for s in slots if s.bundle == i]
            names = " + ".join(f"{s.role}-{s.rank}" for s in members)
            print(f"  bundle {i}: {_fmt_res(bundle):<40} {names:<28} -> {where(host)}")
            if host is None and cfg.roles.strategy != "STRICT_PACK":
                problems.append(f"role {names} (bundle {i} {_fmt_res(bundle)}) cannot be placed: "
                                f"{missing_resources(bundle, free)}")
            elif host is not None and cfg.roles.strategy != "STRICT_PACK":
                _take(bundle, free[host])
        need: dict[str, float] = {}
        for b in bundles:
            for k, v in b.items():
                need[k] = need.get(k, 0.0) + v
        print(f"  total: {_fmt_res(need)}")
        if cfg.roles.strategy == "STRICT_PACK" and hosts and hosts[0] is None:
            names = ", ".join(f"{s.role}-{s.rank}" for s in slots)
            problems.append(f"roles {names}: STRICT_PACK needs all of {_fmt_res(need)} on one node: "
                            f"{missing_resources(need, nodes)}")

        print("\n== SFT / reward model (Ray Train workers; run before PPO, each stage on its own)")
        train = {"CPU": cfg.train_cpus_per_worker,
                 **({"GPU": cfg.train_gpus_per_worker} if device == "cuda" and cfg.train_gpus_per_worker else {})}
        stages = [("sft", cfg.sft_workers)]
        if cfg.reward_model_weight != 0:
            stages.append(("reward", cfg.reward_workers))
        for stage, n in stages:
            hosts = fit_bundles([train] * n, nodes)
            print(f"  {stage}: {n} worker(s) x {_fmt_res(train)} -> "
                  f"{', '.join(where(h) for h in hosts)}")
            if None in hosts:
                why = (missing_resources(train, nodes) if not any(_fits(train, r) for r in nodes.values())
                       else "not enough free resources for all workers at once")
                problems.append(f"{stage} stage: {n} Ray Train worker(s) x {_fmt_res(train)} cannot be placed: {why}")

    print()
    if problems:
        for p in problems:
            print(f"doctor: FAIL: {p}", file=sys.stderr)
        return EXIT_NO_FIT
    print("doctor: ok: every bundle and Ray Train worker fits the cluster")
    return 0

