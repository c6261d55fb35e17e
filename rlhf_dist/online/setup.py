"""Start-up and the per-iteration plumbing of the online roles: where the models come from, starting the
actors, the weight-sync group, sending the weights, saving an iteration and stopping the roles."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..config import ConfigError, RLHFConfig
from ..config.algorithms import ALGORITHMS
from ..config.rewards import active_sources, environment_errors
from ..io.checkpoint import atomic_dir, prune_iterations, safe_join, write_json_atomic
from ..io.sources import check_model_paths, policy_start, reference_model, reward_model, verify_if_sealed
from ..models.load import load_tokenizer
from ..roles.actors import ReferenceWorker, RewardWorker, RolloutWorker
from ..roles.calls import create_placement_group, spawn, wait
from ..roles.learner import Learner
from ..roles.placement import ROLES, cluster_nodes, plan_for_cluster
from ..roles.weight_sync import plan_sync

log = logging.getLogger(__name__)


@dataclass
class Roles:
    rollout: list
    policy: list
    critic: list
    reference: list
    reward: list
    info: list[dict] = field(default_factory=list)
    placement_group: object = None


@dataclass
class Inputs:
    """Where PPO's models come from (`resolve_inputs`)."""

    policy: str  # initial policy weights (policy_model_path, SFT best model, or a resumed iteration)
    reference: str  # frozen reference: reference_model_path, else the policy's start
    critic: str | None  # None: a critic-free algorithm
    reward: str | None
    tokenizer: str
    adapters: str | None = None  # LoRA resume: the iteration whose policy/ and critic/ adapters the learners load


def resolve_inputs(cfg: RLHFConfig, resume_from: Path | None) -> Inputs:
    """Each role's model (`io.sources`: an explicit *_model_path, else the stage output, verified against
    its manifest, else model_name), logged one line per role. A resumed run's learners start from the
    iteration's weights."""
    check_model_paths(cfg)
    errors = environment_errors(cfg)  # before any actor starts: a reward source's environment variable
    if errors:
        raise ConfigError("; ".join(errors))
    start = policy_start(cfg, "ppo")
    if cfg.policy_model_path is None and start[0] == cfg.model_name:
        log.warning("ppo: no complete SFT checkpoint in %s; starting from model_name %s", cfg.save_dir, cfg.model_name)
    critic_from_rm = ALGORITHMS[cfg.algorithm].critic and cfg.critic_model_path is None and cfg.critic_init == "reward"
    rm = reward_model(cfg, "ppo") if cfg.reward_model_weight != 0 or critic_from_rm else None
    if cfg.reward_model_weight != 0 and rm is None:
        raise FileNotFoundError(f"ppo: reward_model_weight is {cfg.reward_model_weight} but "
                                f"{safe_join(cfg.save_dir, 'reward_model', 'best_model')} is not a complete reward "
                                "model; run `rlhf-dist reward` first, set reward_model_path, or set "
                                "reward_model_weight: 0")
    if critic_from_rm and rm is None:
        raise FileNotFoundError("critic_init: 'reward' needs a reward model (reward_model/best_model or "
                                "reward_model_path)")
    critic = _critic_source(cfg, start, rm)
    policy = start
    adapters = None
    if resume_from is not None and cfg.lora_rank:  # the same base models; the iteration's adapters go on top
        adapters = str(resume_from)
        log.info("ppo: the learners take the LoRA adapters of %s (the rollout, their merged weights)", resume_from.name)
    elif resume_from is not None:
        policy = (str(resume_from / "policy"), f"resumed from {resume_from.name}")
        critic = (str(resume_from / "critic"), f"resumed from {resume_from.name}") if critic else None
    reward = rm if cfg.reward_model_weight != 0 else None
    sources = {"rollout": policy, "policy": policy, "critic": critic, "reference": reference_model(cfg, start),
               "reward": reward}
    none_why = {"critic": f"{cfg.algorithm} starts no critic",
                "reward": f"reward_model_weight 0: {', '.join(s.name for s in active_sources(cfg))} only"}
    for role, src in sources.items():
        log.info("ppo: %s loads %s", role, f"{src[0]} ({src[1]})" if src else f"no model ({none_why[role]})")
    return Inputs(policy[0], sources["reference"][0], critic and critic[0], reward and reward[0],
                  cfg.tokenizer_path or start[0], adapters)


def _critic_source(cfg: RLHFConfig, start: tuple[str, str], rm: tuple[str, str] | None) -> tuple[str, str] | None:
    """(model, why) of the critic's start: critic_model_path, else per critic_init; None without a critic."""
    if not ALGORITHMS[cfg.algorithm].critic:
        return None
    if cfg.critic_model_path is not None:
        verify_if_sealed(cfg.critic_model_path)
        src, field = (cfg.critic_model_path, "critic_model_path"), "critic_model_path"
    elif cfg.critic_init == "reward":
        src, field = (rm[0], f"critic_init reward: {rm[1]}"), "critic_init"
    else:
        return start[0], f"critic_init sft: {start[1]}"
    _check_critic_vocab(field, src[0], cfg.tokenizer_path or start[0])
    return src


def _check_critic_vocab(field: str, critic: str, policy_tokenizer: str) -> None:
    """The critic reads the policy's token ids (unlike the reward role, which can re-tokenise the text), so a
    critic with another vocabulary would read them wrongly: an error naming the field."""
    try:
        vocab = load_tokenizer(critic).get_vocab()
    except (OSError, ValueError):  # no tokenizer files beside the weights: nothing to compare
        log.info("ppo: %s has no tokenizer; assuming the policy's", critic)
        return
    if vocab != load_tokenizer(policy_tokenizer).get_vocab():
        raise ConfigError(f"{field}: the critic's start {critic} has another vocabulary than the policy's tokenizer "
                          f"{policy_tokenizer}; the critic reads the policy's tokens")


def start_roles(cfg: RLHFConfig, device: str, inputs: Inputs, total_steps: int) -> Roles:
    # The plan the pre-start check logged (the same pure function of the cluster's totals).
    bundles, slots = plan_for_cluster(cfg, device, cluster_nodes()[0])
    pg = create_placement_group(bundles, cfg.roles.strategy, cfg.setup_timeout_s)
    conf = dict(cfg.to_dict(), _cwd=os.getcwd())
    by_role: dict[str, list] = {r: [] for r in ROLES}
    restarts = cfg.max_restarts  # frozen roles come back by themselves; learners hold optimizer state
    for s in slots:
        if s.role == "rollout":
            a = spawn(RolloutWorker, s, pg, s.rank, conf, s.num_cpus, s.device, inputs.policy, s.num_gpus,
                      max_restarts=restarts)
        elif s.role in ("policy", "critic"):
            a = spawn(Learner, s, pg, s.role, s.rank, getattr(cfg.roles, s.role).num_workers, conf, s.num_cpus,
                      s.device)
        elif s.role == "reference":
            a = spawn(ReferenceWorker, s, pg, s.rank, conf, s.num_cpus, s.device, inputs.reference,
                      max_restarts=restarts)
        else:
            a = spawn(RewardWorker, s, pg, s.rank, conf, s.num_cpus, s.device, inputs.reward, inputs.tokenizer,
                      max_restarts=restarts)
        by_role[s.role].append(a)
    roles = Roles(**by_role, placement_group=pg)
    # Both learner groups load and build their engines at the same time: a tiny run's start-up went from
    # 22.1 s to 17.9 s once the critic stopped waiting for the policy.
    setups = []
    for kind, model_dir in (("policy", inputs.policy), ("critic", inputs.critic)):
        group = getattr(roles, kind)
        if not group:
            continue
        addr, port = wait(group[0].address.remote(), kind, "setup", cfg.setup_timeout_s)
        adapter_dir = str(Path(inputs.adapters) / kind) if inputs.adapters else None
        setups.append((kind, [a.setup.remote(addr, port, model_dir, total_steps, adapter_dir) for a in group]))
    for kind, refs in setups:
        wait(refs, kind, "setup", cfg.setup_timeout_s)
    roles.info = wait([a.info.remote() for r in by_role.values() for a in r], "all", "setup", cfg.setup_timeout_s)
    for i in roles.info:
        log.info("role %s-%d on node %s pid %d (%d threads, %s)", i["role"], i["rank"], i["node_id"][:12], i["pid"],
                 i["threads"], i["device"])
    join_weight_sync(cfg, roles)
    return roles


def join_weight_sync(cfg: RLHFConfig, roles: Roles) -> None:
    """Choose each rollout worker's transport from where it sits against policy rank 0, and connect them:
    CUDA IPC on the same GPU, else a broadcast group (learner rank 0 + those workers; NCCL or gloo)."""
    T = cfg.setup_timeout_s
    learner = roles.policy[0]
    ids = wait([a.device_id.remote() for a in [learner, *roles.rollout]], "rollout", "sync", T)
    plan = plan_sync(ids[0], ids[1:])
    sig = wait(learner.signature.remote(), "policy", "sync", T)
    world = 1 + len(plan.group_ranks)
    addr, port = wait(learner.address.remote(), "policy", "sync", T)
    ipc = [roles.rollout[i] for i, t in enumerate(plan.transports) if t == "ipc"]
    refs = [a.join_sync.remote(addr, port, world, plan.backend, ipc) for a in roles.policy]
    group_rank = {w: r + 1 for r, w in enumerate(plan.group_ranks)}
    refs += [a.join_sync.remote(sig, addr, port, group_rank.get(i), world, plan.backend)
             for i, a in enumerate(roles.rollout)]
    wait(refs, "rollout", "sync", T)
    log.info("weight sync: %s", ", ".join(f"rollout-{i} by {'CUDA IPC' if t == 'ipc' else plan.backend + ' broadcast'}"
                                          for i, t in enumerate(plan.transports)))


def split(n: int, parts: int) -> list[tuple[int, int]]:
    """Contiguous [start, end) ranges of near-equal size."""
    base, extra = divmod(n, parts)
    out, start = [], 0
    for i in range(parts):
        end = start + base + (1 if i < extra else 0)
        out.append((start, end))
        start = end
    return out


def sync_weights(cfg: RLHFConfig, roles: Roles, version: int) -> int:
    """Every policy rank sends (rank 0 for real; the others join ZeRO-3's gathers); every rollout worker
    takes the broadcast or, on rank 0's GPU, receives its buckets by IPC during the send. Only once every
    sender has returned, so every bucket has landed, does each worker check what landed against the
    sender's fingerprints and switch to the new weights (`finish_sync`): an IPC worker has nothing to
    receive, and would otherwise switch before its buckets arrive."""
    refs = [a.send_weights.remote() for a in roles.policy] + [a.receive_weights.remote() for a in roles.rollout]
    sent = wait(refs, "rollout", "sync", cfg.sync_timeout_s)[0]  # policy rank 0's
    wait([a.finish_sync.remote(version, sent["fingerprints"]) for a in roles.rollout], "rollout", "sync",
         cfg.sync_timeout_s)
    return sent["bytes"]


def save_iteration(cfg: RLHFConfig, roles: Roles, out: Path, tokenizer_dir: str, state: dict) -> None:
    T = cfg.call_timeout_s
    with atomic_dir(out) as tmp:
        for kind in ("policy", "critic"):  # LoRA: the adapters only, the base weights are the run's inputs
            saves = [a.save_adapter.remote(str(tmp / kind)) if cfg.lora_rank else
                     a.save.remote(str(tmp / kind), tokenizer_dir) for a in getattr(roles, kind)]
            wait(saves, kind, "checkpoint", T)
        wait([a.save_state.remote(str(tmp / "policy_engine")) for a in roles.policy], "policy", "checkpoint", T)
        wait([a.save_state.remote(str(tmp / "critic_engine")) for a in roles.critic], "critic", "checkpoint", T)
        write_json_atomic(tmp / "state.json", state)
    log.info("ppo: checkpoint %s", out)
    prune_iterations(out.parent, cfg.save_total_limit, writing=out)


def stop_roles(roles: Roles) -> None:
    import ray  # deferred: loading ray takes seconds

    for group in (roles.rollout, roles.policy, roles.critic, roles.reference, roles.reward):
        for a in group:
            ray.kill(a)
    # Give the bundles back, or the next stage on this Ray (e.g. another run's SFT) waits forever.
    ray.util.remove_placement_group(roles.placement_group)
