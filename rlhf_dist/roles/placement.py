"""Where the PPO roles and the Ray Train workers go, checked before anything starts.

The pure part (no Ray, no torch) turns the config and the cluster's resources into placement-group
bundles and actor slots, and says what is wrong with them: what can never fit the cluster's totals
(an error), what does not fit the free resources now (a warning: another job may hold them for a
while), and where NCCL would find two ranks of one process group on one GPU (an error).
`check_cluster` runs it on the live Ray cluster before a stage starts; `rlhf-dist doctor` prints it.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

from ..config.algorithms import ALGORITHMS
from ..config.engines import installed_engines
from ..config.stages import OFFLINE, STAGES
from ..rollout.engines import choose_engine
from ..rollout.vllm_engine import vllm_sleeps
from ..runtime.errors import PlacementError

log = logging.getLogger(__name__)

ROLES = ("rollout", "policy", "critic", "reference", "reward")
LEARNERS = ("policy", "critic")  # roles whose workers form a data-parallel process group
AUTO_CPUS_MAX = 8.0  # an actor at auto gets at most this: more torch threads rarely pay for one actor
AUTO_CPUS_MIN = 0.1  # below this an actor barely runs; such a plan fails the fit check and says so
AUTO_CPUS_UNKNOWN = 1.0  # per auto actor when the cluster's CPUs are not known (a plan made without Ray)
_GRID = 100  # auto CPU shares round down to 0.01: their sum stays within the total
_EPS = 1e-9  # resource amounts are floats (0.3 CPU, 0.25 GPU): compare with a tolerance


@dataclass
class Slot:
    role: str
    rank: int
    bundle: int  # index in the placement group
    num_cpus: float  # what the actor asks of its bundle
    num_gpus: float
    resources: dict
    device: str = "cpu"  # cuda only for an actor with a GPU share on a CUDA run


# ---------------------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------------------

def _spec(roles, role: str):
    return getattr(roles, role)


def roles_of(cfg) -> tuple[str, ...]:
    """The roles a run starts: critic-free algorithms (grpo, rloo, reinforce_pp) start no critic; with LoRA
    no reference starts (the policy learner computes its logprobs with the adapters off)."""
    critic = ALGORITHMS[cfg.algorithm].critic
    return tuple(r for r in ROLES if (r != "critic" or critic) and (r != "reference" or not cfg.lora_rank))


def _hosts(roles, names) -> dict[str, str]:
    """With colocate: the guest role -> the role whose bundle (and GPUs) it joins."""
    if not roles.colocate:
        return {}
    return {"reference": "policy", **({"reward": "critic"} if "critic" in names else {})}


def auto_gpu_share(roles, gpus_available: float, names=ROLES) -> float:
    """GPUs per bundle when every role is at num_gpus 0 on CUDA: 1/k, k bundles per GPU, so they fill whole GPUs."""
    if gpus_available <= 0 or any(_spec(roles, r).num_gpus for r in names):
        return 0.0
    guests = _hosts(roles, names)  # they join a host's bundle and its GPU
    n = sum(_spec(roles, r).num_workers for r in names if r not in guests)
    return 1.0 if n <= gpus_available else 1.0 / math.ceil(n / gpus_available)


def _clamp_cpus(x: float) -> float:
    return max(AUTO_CPUS_MIN, min(AUTO_CPUS_MAX, math.floor(x * _GRID + 1e-6) / _GRID))


def auto_cpu_shares(node_cpus: list[float], reserved: float, n_auto: int) -> list[float]:
    """CPUs per auto actor to try, largest first: the even split of what explicit roles leave over the
    auto actors, then the splits c/k of one node's CPUs (which pack whole actors into nodes)."""
    even = _clamp_cpus((sum(node_cpus) - reserved) / n_auto)
    more = {_clamp_cpus(c / k) for c in node_cpus for k in range(1, n_auto + 1)}
    return [even] + sorted((s for s in more if s < even), reverse=True)


def _build(roles, names, auto_gpu: float, auto_cpu: float, device: str) -> tuple[list[dict], list[Slot]]:
    """Bundles and slots for given auto shares. With colocate, reference joins policy's bundle, reward critic's."""
    bundles: list[dict] = []
    slots: list[Slot] = []
    shared = _hosts(roles, names)
    host_bundle: dict[tuple[str, int], int] = {}
    for role in names:
        spec = _spec(roles, role)
        gpus = spec.num_gpus or auto_gpu
        cpus = auto_cpu if spec.num_cpus is None else spec.num_cpus
        for rank in range(spec.num_workers):
            host = shared.get(role)
            if host is not None:
                # Colocated: the actor joins its host's bundle and shares its GPUs (that is the saving);
                # CPUs and custom resources add up, since each actor still runs its own threads.
                b = host_bundle[(host, rank % _spec(roles, host).num_workers)]
                merged = dict(bundles[b])
                merged["CPU"] = merged.get("CPU", 0) + cpus
                for k, v in spec.resources.items():
                    merged[k] = max(merged.get(k, 0), v)
                if gpus and "GPU" not in merged:
                    merged["GPU"] = gpus
                bundles[b] = merged
                slots.append(Slot(role, rank, b, cpus, 0.0, {}))
                continue
            host_bundle[(role, rank)] = len(bundles)
            slots.append(Slot(role, rank, len(bundles), cpus, gpus, dict(spec.resources)))
            bundles.append({"CPU": cpus, **({"GPU": gpus} if gpus else {}), **spec.resources})
    for b, bundle in enumerate(bundles):
        members = [x for x in slots if x.bundle == b]
        if len(members) > 1:
            for x in members:  # equal shares of the bundle's GPUs, and of its custom resources
                x.num_gpus = bundle.get("GPU", 0.0) / len(members)
                x.resources = {k: v / len(members) for k, v in bundle.items() if k not in ("CPU", "GPU")}
    for x in slots:  # an actor without a GPU share runs on the CPU, whatever the others do
        x.device = "cuda" if device == "cuda" and x.num_gpus > 0 else "cpu"
    return bundles, slots


def plan_placement(cfg, gpus_available: float, node_cpus: list[float] | None = None,
                   device: str | None = None) -> tuple[list[dict], list[Slot]]:
    """Bundles and the actor slots in them. Pure: doctor and the pre-start check print it before loading anything.

    gpus_available: the GPUs the run may use (0 unless it runs on CUDA). node_cpus: each node's total CPUs;
    None = not known, and an actor at num_cpus auto asks AUTO_CPUS_UNKNOWN. device: the run's device
    (default: cuda when gpus_available). Explicit num_cpus / num_gpus are kept as given. Auto CPUs: the
    largest share from `auto_cpu_shares` whose bundles fit the nodes' CPUs. Auto GPUs: `auto_gpu_share`.
    """
    roles, names = cfg.roles, roles_of(cfg)
    device = device or ("cuda" if gpus_available > 0 else "cpu")
    auto_gpu = auto_gpu_share(roles, gpus_available, names)
    auto = [r for r in names if _spec(roles, r).num_cpus is None]
    n_auto = sum(_spec(roles, r).num_workers for r in auto)
    if not n_auto or node_cpus is None:
        return _build(roles, names, auto_gpu, AUTO_CPUS_UNKNOWN, device)
    reserved = sum(_spec(roles, r).num_cpus * _spec(roles, r).num_workers for r in names if r not in auto)
    nodes = {str(i): {"CPU": c} for i, c in enumerate(node_cpus)}
    first = None
    for share in auto_cpu_shares(node_cpus, reserved, n_auto):
        plan = _build(roles, names, auto_gpu, share, device)
        first = first or plan
        if None not in fit_bundles([{"CPU": b["CPU"]} for b in plan[0]], nodes, roles.strategy):
            return plan
    return first  # nothing fits: the even split, and the fit check names what is missing


def plan_for_cluster(cfg, device: str, nodes: dict[str, dict]) -> tuple[list[dict], list[Slot]]:
    """The plan on a cluster given as {node_id: total resources} (as start_roles and doctor see it)."""
    gpus = int(sum(r.get("GPU", 0) for r in nodes.values()) + _EPS) if device == "cuda" else 0
    return plan_placement(cfg, gpus, [r.get("CPU", 0.0) for r in nodes.values()], device)


TRAIN_STAGES = tuple(s.name for s in OFFLINE)  # Ray Train jobs: their workers field x train_bundle each


def train_bundle(cfg, device: str) -> dict:
    """One Ray Train worker's resources, as offline.job.run_supervised asks for them."""
    g = cfg.train_gpus_per_worker
    return {"CPU": cfg.train_cpus_per_worker, **({"GPU": g} if device == "cuda" and g else {})}


def describe_plan(cfg, bundles: list[dict], slots: list[Slot]) -> list[str]:
    """One line per actor, saying which values were sized automatically (logged before the roles start)."""
    out = []
    for s in slots:
        spec = _spec(cfg.roles, s.role)
        cpu = " (auto)" if spec.num_cpus is None else ""
        gpu = " (auto)" if s.num_gpus and not spec.num_gpus else ""
        out.append(f"{s.role}-{s.rank}: {s.num_cpus:g} CPU{cpu}, {s.num_gpus:g} GPU{gpu}, device {s.device}, "
                   f"bundle {s.bundle} {fmt_res(bundles[s.bundle])}{_engine_note(cfg, s)}")
    return out


def _engine_note(cfg, s: Slot) -> str:
    """A rollout slot's engine and why (`rollout.engine.choose_engine`, judged on this machine's packages)."""
    if s.role != "rollout":
        return ""
    name, why = choose_engine(cfg.rollout_engine, s.device, installed_engines())
    sleep = ", sleeps between rollouts" if name == "vllm" and vllm_sleeps(cfg.vllm_sleep, s.device, s.num_gpus) else ""
    return f", engine {name} ({why}{sleep})"


# ---------------------------------------------------------------------------------------
# Fitting (a rough model of Ray's scheduler)
# ---------------------------------------------------------------------------------------

def _fits(need: dict, avail: dict) -> bool:
    return all(avail.get(k, 0.0) + _EPS >= v for k, v in need.items() if v > 0)


def _take(need: dict, avail: dict) -> None:
    for k, v in need.items():
        avail[k] = avail.get(k, 0.0) - v


def _sum(bundles: list[dict]) -> dict:
    total: dict[str, float] = {}
    for b in bundles:
        for k, v in b.items():
            total[k] = total.get(k, 0.0) + v
    return total


def fit_bundles(bundles: list[dict], nodes: dict[str, dict], strategy: str = "PACK") -> list[str | None]:
    """First-fit of `bundles` over {node_id: resources}; the node per bundle, None where none fits.

    PACK and SPREAD are soft in Ray, so any placement counts; STRICT_PACK needs one node for all
    bundles, STRICT_SPREAD a different node per bundle.
    """
    free = {n: dict(r) for n, r in nodes.items()}
    if strategy == "STRICT_PACK":
        total = _sum(bundles)
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
            short.append(f"{k} (needs {_num(v)}, most left on one node: {_num(most)})")
    if short:
        return "missing " + ", ".join(short)
    return "each resource exists somewhere, but no single node has all of them left at once"


def bundle_overflow(bundles: list[dict], slots) -> list[str]:
    """Bundles whose actors ask for more than the bundle holds: such an actor would never start."""
    out = []
    for b, bundle in enumerate(bundles):
        members = [s for s in slots if s.bundle == b]
        asks = _sum([{"CPU": s.num_cpus, "GPU": s.num_gpus, **s.resources} for s in members])
        over = {k: v for k, v in asks.items() if v > bundle.get(k, 0.0) + _EPS}
        if over:
            askers = [s for s in members if any({"CPU": s.num_cpus, "GPU": s.num_gpus, **s.resources}.get(k)
                                                for k in over)]
            names = " + ".join(f"{s.role}-{s.rank}" for s in askers)
            out.append(f"role {names} asks for {fmt_res(over)} in all but bundle {b} holds only {fmt_res(bundle)}: "
                       "the actor could never start (the placement plan is inconsistent)")
    return out


def bundle_problems(bundles: list[dict], slots, nodes: dict[str, dict], strategy: str) -> list[str]:
    """The PPO bundles that do not fit `nodes`, each naming its roles and the missing resource."""
    hosts = fit_bundles(bundles, nodes, strategy)
    if strategy == "STRICT_PACK":
        if hosts and hosts[0] is None:
            names = ", ".join(f"{s.role}-{s.rank}" for s in slots)
            need = _sum(bundles)
            return [f"roles {names}: STRICT_PACK needs all of {fmt_res(need)} on one node: "
                    f"{missing_resources(need, nodes)}"]
        return []
    out = []
    free = {n: dict(r) for n, r in nodes.items()}
    for i, (bundle, host) in enumerate(zip(bundles, hosts)):
        if host is None:
            names = " + ".join(f"{s.role}-{s.rank}" for s in slots if s.bundle == i)
            out.append(f"role {names} (bundle {i} {fmt_res(bundle)}) cannot be placed: "
                       f"{missing_resources(bundle, free)}")
        else:
            _take(bundle, free[host])
    return out


def train_problems(cfg, stage: str, device: str, nodes: dict[str, dict]) -> list[str]:
    """A Ray Train stage whose workers do not all fit `nodes` at once (Ray Train packs them)."""
    workers = STAGES[stage].fields.workers
    n = getattr(cfg, workers)
    bundle = train_bundle(cfg, device)
    if None not in fit_bundles([bundle] * n, nodes):
        return []
    why = (missing_resources(bundle, nodes) if not any(_fits(bundle, r) for r in nodes.values())
           else "not enough resources for all workers at once")
    return [f"{stage} stage: {n} Ray Train worker(s) x {fmt_res(bundle)} cannot be placed: {why} "
            f"({workers}, train_cpus_per_worker, train_gpus_per_worker)"]


def nccl_conflicts(cfg, bundles: list[dict], slots, device: str, stages) -> list[str]:
    """Process groups whose ranks can share a GPU: NCCL refuses them ("Duplicate GPU detected").

    A bundle with a whole GPU (or more) gets GPUs of its own; fractional bundles can land on one GPU.
    Groups: a learner role with several workers (its data-parallel group), a Ray Train stage with several.
    """
    if device != "cuda":
        return []
    out = []
    for role in [r for r in LEARNERS if r in roles_of(cfg)] if "ppo" in stages else ():
        n = _spec(cfg.roles, role).num_workers
        mine = [s for s in slots if s.role == role and s.device == "cuda"]
        gpus = min((bundles[s.bundle].get("GPU", 0.0) for s in mine), default=1.0)
        if n > 1 and gpus < 1 - _EPS:
            auto = " (auto: every role at num_gpus 0 shares the GPUs)" if not _spec(cfg.roles, role).num_gpus else ""
            out.append(f"roles.{role}: {n} workers at {gpus:g} GPU each{auto} can land on one GPU, and NCCL refuses "
                       f"two ranks of its data-parallel group on one device; give each {role} worker 1 GPU "
                       f"(roles.{role}.num_gpus: 1) or use 1 worker")
    g = cfg.train_gpus_per_worker
    for stage in (s for s in stages if s in TRAIN_STAGES):
        workers = STAGES[stage].fields.workers
        n = getattr(cfg, workers)
        if n > 1 and g < 1 - _EPS:
            out.append(f"{stage} stage: {workers} {n} at train_gpus_per_worker {g:g} can land on one GPU, and "
                       f"NCCL refuses two ranks of the stage's process group on one device; set "
                       f"train_gpus_per_worker: 1 or {workers}: 1")
    return out


@dataclass
class PlacementCheck:
    errors: list[str] = field(default_factory=list)  # can never work on this cluster
    warnings: list[str] = field(default_factory=list)  # does not fit the free resources now
    bundles: list[dict] = field(default_factory=list)  # the PPO plan (empty without the ppo stage)
    slots: list[Slot] = field(default_factory=list)


def placement_problems(cfg, stages, device: str, total: dict[str, dict],
                       free: dict[str, dict] | None = None) -> PlacementCheck:
    """Everything that stops `stages` from starting on a cluster of `total` ({node_id: resources}).

    Totals decide "can never fit" (errors); `free` (another job may hold resources for a while, and
    the stage then waits up to setup_timeout_s) only "does not fit now" (warnings).
    """
    out = PlacementCheck()
    if "ppo" in stages:
        out.bundles, out.slots = plan_for_cluster(cfg, device, total)
        never = bundle_overflow(out.bundles, out.slots) + bundle_problems(out.bundles, out.slots, total,
                                                                          cfg.roles.strategy)
        out.errors += never
        if not never and free is not None:
            out.warnings += bundle_problems(out.bundles, out.slots, free, cfg.roles.strategy)
    for stage in (s for s in stages if s in TRAIN_STAGES):
        never = train_problems(cfg, stage, device, total)
        out.errors += never
        if not never and free is not None:
            out.warnings += train_problems(cfg, stage, device, free)
    out.errors += nccl_conflicts(cfg, out.bundles, out.slots, device, stages)
    return out


def cluster_nodes() -> tuple[dict[str, dict], dict[str, dict]]:
    """({node_id: total resources}, {node_id: free resources}) of the alive nodes of the connected Ray."""
    import ray  # deferred: loading ray takes seconds

    total = {n["NodeID"]: dict(n["Resources"]) for n in ray.nodes() if n["Alive"]}
    try:  # per-node *available* resources (a running job's actors count); DeveloperAPI, so fall back to totals
        from ray._private.state import available_resources_per_node  # deferred: loading ray takes seconds

        avail = available_resources_per_node()
    except Exception as e:  # noqa: BLE001 - any failure: totals are still a useful answer
        log.debug("available_resources_per_node failed (%s); using totals", e)
        avail = {}
    return total, {nid: dict(avail.get(nid, r)) for nid, r in total.items()}


def check_cluster(cfg, stages, device: str) -> PlacementCheck:
    """Before a stage starts: log the plan, warn about busy resources, raise PlacementError on what can never work."""
    total, free = cluster_nodes()
    res = placement_problems(cfg, tuple(stages), device, total, free)
    if res.slots:
        log.info("placement plan on %d node(s) with %s:\n  %s", len(total), fmt_res(_sum(list(total.values()))),
                 "\n  ".join(describe_plan(cfg, res.bundles, res.slots)))
    for w in res.warnings:
        log.warning("placement: not free now (another job may hold it; the stage waits up to setup_timeout_s): %s", w)
    if res.errors:
        raise PlacementError("cannot start on this cluster:\n  " + "\n  ".join(res.errors))
    return res


def _num(v: float) -> str:
    return f"{v:g}"


def fmt_res(res: dict) -> str:
    """Resources for humans: hide Ray's per-node markers, bytes in GiB."""
    parts = []
    for k in sorted(res):
        if k.startswith("node:"):
            continue
        v = res[k]
        parts.append(f"{k}: {v / 2**30:.1f}GiB" if k in ("memory", "object_store_memory") else f"{k}: {_num(v)}")
    return "{" + ", ".join(parts) + "}"
