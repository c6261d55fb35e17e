"""The PPO driver. One iteration reads as the data flow, with the same phase names in the code,
the timers and the metrics: rollout -> experience -> advantages -> learner -> sync -> checkpoint.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .algo import AdaptiveKLController, FixedKLController
from .checkpoint import atomic_dir, complete_iterations, is_complete, write_json_atomic
from .config import RLHFConfig
from .data import read_dataset, tokenize_prompts
from .experience import experience_stats, make_experience
from .models import load_tokenizer
from .rollout import merge_samples, slice_samples
from .runtime import (Learner, ReferenceWorker, RewardWorker, RolloutWorker, create_placement_group, plan_placement,
                      spawn, wait)
from .tracking import MetricsWriter

log = logging.getLogger(__name__)

class Timers:
    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def phase(self, name: str):
        t = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t


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
    """Where PPO's models come from, resolved from the standard layout."""

    policy: str  # initial policy weights (SFT best model, or a resumed iteration)
    reference: str  # frozen reference = the SFT policy
    critic: str
    reward: str | None
    tokenizer: str


def resolve_inputs(cfg: RLHFConfig, resume_from: Path | None) -> Inputs:
    save = Path(cfg.save_dir)
    sft = save / "sft" / "best_model"
    rm = save / "reward_model" / "best_model"
    reference = str(sft) if is_complete(sft) else cfg.model_name
    if not is_complete(sft):
        log.warning("ppo: no complete SFT checkpoint at %s; starting from model_name %s", sft, cfg.model_name)
    reward = None
    if cfg.reward_model_weight != 0:
        if not is_complete(rm):
            raise FileNotFoundError(f"ppo: reward_model_weight is {cfg.reward_model_weight} but {rm} is not a "
                                    f"complete reward model; run `rlhf-dist reward` first or set reward_model_weight: 0")
        reward = str(rm)
    critic = str(rm) if cfg.critic_init == "reward" and reward else reference
    if cfg.critic_init == "reward" and not reward:
        raise FileNotFoundError("critic_init: 'reward' needs a reward model")
    policy = reference
    if resume_from is not None:
        policy, critic = str(resume_from / "policy"), str(resume_from / "critic")
    return Inputs(policy, reference, critic, reward, cfg.tokenizer_path or reference)


def start_roles(cfg: RLHFConfig, device: str, inputs: Inputs, total_steps: int) -> Roles:
    import ray

    gpus = int(ray.cluster_resources().get("GPU", 0)) if device == "cuda" else 0
    bundles, slots = plan_placement(cfg, gpus)
    pg = create_placement_group(bundles, cfg.roles.strategy, cfg.call_timeout_s)
    conf = dict(cfg.to_dict(), _cwd=os.getcwd())
    by_role: dict[str, list] = {r: [] for r in ("rollout", "policy", "critic", "reference", "reward")}
    for s in slots:
        if s.role == "rollout":
            a = spawn(RolloutWorker, s, pg, s.rank, conf, s.num_cpus, device, inputs.policy)
        elif s.role in ("policy", "critic"):
            a = spawn(Learner, s, pg, s.role, s.rank, getattr(cfg.roles, s.role).num_workers, conf, s.num_cpus, device)
        elif s.role == "reference":
            a = spawn(ReferenceWorker, s, pg, s.rank, conf, s.num_cpus, device, inputs.reference)
        else:
            a = spawn(RewardWorker, s, pg, s.rank, conf, s.num_cpus, device, inputs.reward, inputs.tokenizer)
        by_role[s.role].append(a)
    roles = Roles(**by_role, placement_group=pg)
    for kind, model_dir in (("policy", inputs.policy), ("critic", inputs.critic)):
        group = getattr(roles, kind)
        addr, port = wait(group[0].address.remote(), kind, "setup", cfg.call_timeout_s)
        wait([a.setup.remote(addr, port, model_dir, total_steps) for a in group], kind, "setup", cfg.call_timeout_s)
    roles.info = wait([a.info.remote() for r in by_role.values() for a in r], "all", "setup", cfg.call_timeout_s)
    for i in roles.info:
        log.info("role %s-%d on node %s pid %d (%d threads, %s)", i["role"], i["rank"], i["node_id"][:12], i["pid"],
                 i["threads"], i["device"])
    join_weight_sync(cfg, roles)
    return roles


def join_weight_sync(cfg: RLHFConfig, roles: Roles) -> None:
    """Learner rank 0 + every rollout worker form the dedicated weight-sync group."""
    learner = roles.policy[0]
    addr, port = wait(learner.address.remote(), "policy", "sync", cfg.call_timeout_s)
    sig = wait(learner.signature.remote(), "policy", "sync", cfg.call_timeout_s)
    world = 1 + len(roles.rollout)
    refs = [learner.join_sync.remote(addr, port, 0, world, sig)]
    refs += [a.join_sync.remote(addr, port, i + 1, world, sig) for i, a in enumerate(roles.rollout)]
    wait(refs, "rollout", "sync", cfg.sync_timeout_s)


def split(n: int, parts: int) -> list[tuple[int, int]]:
    """Contiguous [start, end) ranges of near-equal size."""
    base, extra = divmod(n, parts)
    out, start = [], 0
    for i in range(parts):
        end = start + base + (1 if i < extra else 0)
        out.append((start, end))
        start = end
    return out


class PromptSampler:
    """Seeded passes over the prompt set; the cursor (prompts consumed) is all the state there is."""

    def __init__(self, n: int, seed: int, cursor: int = 0):
        self.n, self.seed, self.cursor = n, seed, cursor

    def next(self, k: int) -> list[int]:
        out = []
        while len(out) < k:
            epoch, pos = divmod(self.cursor, self.n)
            order = list(range(self.n))
            random.Random(self.seed + epoch).shuffle(order)
            take = min(k - len(out), self.n - pos)
            out.extend(order[pos:pos + take])
            self.cursor += take
        return out


def run_ppo(cfg: RLHFConfig, device: str) -> Path:
    save = Path(cfg.save_dir)
    ppo_dir = save / "ppo"
    ppo_dir.mkdir(parents=True, exist_ok=True)
    done = complete_iterations(ppo_dir)
    resume_from = done[-1] if done else None
    state = {}
    if resume_from is not None:
        import json

        from .checkpoint import verify

        verify(resume_from)
        state = json.loads((resume_from / "state.json").read_text())
        log.info("ppo: resuming from %s (iteration %d)", resume_from, state["iteration"])
    inputs = resolve_inputs(cfg, resume_from)
    tok = load_tokenizer(inputs.tokenizer)
    rows, stats = read_dataset(cfg.ppo_data_path, "prompt", cfg.bad_rows, cfg.max_bad_fraction)
    prompt_ids = tokenize_prompts(tok, rows, cfg.max_length - cfg.gen_max_new_tokens, cfg.truncate, stats)
    prompts = [r.prompt for r in rows]
    log.info("ppo: %d prompts (%s)", len(prompts), stats.summary())

    kl_ctl = (AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon) if cfg.kl_target
              else FixedKLController(cfg.kl_coef))
    if "kl_ctl" in state:
        kl_ctl.load_state_dict(state["kl_ctl"])
    sampler = PromptSampler(len(prompts), cfg.seed, state.get("cursor", 0))
    start_it = state.get("iteration", 0)
    steps_per_it = cfg.ppo_epochs * (cfg.ppo_batch_size // cfg.ppo_mini_batch_size)
    roles = start_roles(cfg, device, inputs, cfg.ppo_iterations * steps_per_it)
    version = state.get("version", 0)
    if resume_from is not None:  # verified above: optimizer states, then the rollout gets the weights
        for kind in ("policy", "critic"):
            wait([a.load_state.remote(str(resume_from / f"{kind}_engine")) for a in getattr(roles, kind)], kind,
                 "setup", cfg.call_timeout_s)
        _sync(cfg, roles, version)
    metrics = MetricsWriter(ppo_dir / "metrics.jsonl")
    samples_log = MetricsWriter(ppo_dir / "samples.jsonl")
    T = cfg.call_timeout_s
    try:
        for it in range(start_it, cfg.ppo_iterations):
            timers = Timers()
            t_iter = time.perf_counter()
            ids = sampler.next(cfg.ppo_batch_size)
            with timers.phase("rollout"):
                parts = split(len(ids), len(roles.rollout))
                refs = [a.generate.remote([prompt_ids[i] for i in ids[s:e]], ids[s:e], cfg.seed * 100003 + it * 101 + k,
                                          tok.pad_token_id, tok.eos_token_id)
                        for k, (a, (s, e)) in enumerate(zip(roles.rollout, parts))]
                samples = merge_samples(wait(refs, "rollout", "rollout", T), tok.pad_token_id)
            with timers.phase("experience"):
                # All four forwards run at once, each on its own actors.
                def fan(group, method, *extra):
                    return [getattr(a, method).remote(slice_samples(samples, s, e), *extra)
                            for a, (s, e) in zip(group, split(len(samples), len(group)))]
                r_old = fan(roles.policy, "forward")
                r_val = fan(roles.critic, "forward")
                r_ref = fan(roles.reference, "logprobs")
                r_rew = [a.score.remote(slice_samples(samples, s, e), [prompts[i] for i in samples.sample_ids[s:e]])
                         for a, (s, e) in zip(roles.reward, split(len(samples), len(roles.reward)))]
                old_logp = torch.cat(wait(r_old, "policy", "experience", T))  # (B, R)
                values = torch.cat(wait(r_val, "critic", "experience", T))  # (B, R)
                ref_logp = torch.cat(wait(r_ref, "reference", "experience", T))  # (B, R)
                rew = wait(r_rew, "reward", "experience", T)
                scores = torch.cat([r["score"] for r in rew])  # (B,)
                responses = [t for r in rew for t in r["responses"]]
            with timers.phase("advantages"):
                exp = make_experience(samples, old_logp, ref_logp, values, scores, kl_coef=kl_ctl.value,
                                      kl_estimator=cfg.kl_estimator, gamma=cfg.ppo_gamma, lam=cfg.ppo_lam,
                                      whiten=cfg.ppo_whiten_advantages)
                est = experience_stats(exp)
            with timers.phase("learner"):
                seed = cfg.seed * 7919 + it
                r_pol = [a.train.remote(exp, seed) for a in roles.policy]
                r_cri = [a.train.remote(exp, seed) for a in roles.critic]
                pstats = wait(r_pol, "policy", "learner", T)[0]
                cstats = wait(r_cri, "critic", "learner", T)[0]
            version = pstats["version"]
            with timers.phase("sync"):
                moved = _sync(cfg, roles, version)
            kl_ctl.update(est["kl"], cfg.ppo_batch_size)
            with timers.phase("checkpoint"):
                if (it + 1) % cfg.save_interval == 0 or it + 1 == cfg.ppo_iterations:
                    _save_iteration(cfg, roles, ppo_dir / f"iteration_{it + 1:06d}", inputs.tokenizer, {
                        "iteration": it + 1, "cursor": sampler.cursor, "version": version,
                        "kl_ctl": kl_ctl.state_dict()})
            seconds = time.perf_counter() - t_iter
            gen_tokens = float(samples.action_mask.sum())
            rec = {"iteration": it + 1, **est, "kl_coef": kl_ctl.value,
                   **{k: pstats[k] for k in ("policy_loss", "clip_frac", "approx_kl", "entropy", "grad_norm",
                                             "first_ratio_mean", "first_ratio_dev_max") if k in pstats},
                   "value_loss": cstats.get("value_loss"), "value_clip_frac": cstats.get("value_clip_frac"),
                   "critic_grad_norm": cstats.get("grad_norm"),
                   "rollout_logprob_diff": float(((samples.rollout_logprobs - old_logp).abs() * samples.action_mask).max()),
                   "weight_version": version, "rollout_version": samples.version, "sync_bytes": moved,
                   "seconds": seconds, "tokens_per_s": gen_tokens / seconds, "samples_per_s": len(samples) / seconds,
                   **{f"time/{k}": v for k, v in timers.seconds.items()}}
            for r in rew:
                for key in ("rm_score", "fn_score"):
                    if key in r:
                        rec.setdefault(key, []).append(r[key])
            for key in ("rm_score", "fn_score"):
                if key in rec:
                    rec[key] = float(torch.cat(rec[key]).mean())
            metrics.write(rec)
            if it % cfg.wandb.sample_every == 0 or it + 1 == cfg.ppo_iterations:
                kl_seq = (exp.kl * exp.action_mask).sum(1)
                for j in range(min(4, len(responses))):
                    samples_log.write({"iteration": it + 1, "prompt": prompts[samples.sample_ids[j]][-1]["content"],
                                       "response": responses[j], "reward": float(scores[j]), "kl": float(kl_seq[j])})
            log.info("ppo: iteration %d/%d reward %.3f kl %.4f policy_loss %.4f value_loss %.4f len %.1f %.2fs (%s)",
                     it + 1, cfg.ppo_iterations, est["reward_mean"], est["kl"], rec.get("policy_loss", 0.0),
                     rec.get("value_loss") or 0.0, est["response_length"], seconds,
                     " ".join(f"{k}={v:.2f}" for k, v in timers.seconds.items()))
        final = ppo_dir / "final_model"
        with atomic_dir(final) as tmp:
            wait([a.save.remote(str(tmp), inputs.tokenizer) for a in roles.policy], "policy", "checkpoint", T)
            wait([a.save.remote(str(tmp / "critic"), inputs.tokenizer) for a in roles.critic], "critic", "checkpoint", T)
        log.info("ppo: final model at %s", final)
        return final
    finally:
        metrics.close()
        samples_log.close()
        _stop(roles)


def _sync(cfg: RLHFConfig, roles: Roles, version: int) -> int:
    refs = [roles.policy[0].send_weights.remote()] + [a.receive_weights.remote(version) for a in roles.rollout]
    return wait(refs, "rollout", "sync", cfg.sync_timeout_s)[0]


def _save_iteration(cfg: RLHFConfig, roles: Roles, out: Path, tokenizer_dir: str, state: dict) -> None:
    T = cfg.call_timeout_s
    with atomic_dir(out) as tmp:
        wait([a.save.remote(str(tmp / "policy"), tokenizer_dir) for a in roles.policy], "policy", "checkpoint", T)
        wait([a.save.remote(str(tmp / "critic"), tokenizer_dir) for a in roles.critic], "critic", "checkpoint", T)
        wait([a.save_state.remote(str(tmp / "policy_engine")) for a in roles.policy], "policy", "checkpoint", T)
        wait([a.save_state.remote(str(tmp / "critic_engine")) for a in roles.critic], "critic", "checkpoint", T)
        write_json_atomic(tmp / "state.json", state)
    log.info("ppo: checkpoint %s", out)


def _stop(roles: Roles) -> None:
    import ray

    for group in (roles.rollout, roles.policy, roles.critic, roles.reference, roles.reward):
        for a in group:
            ray.kill(a)
    # Give the bundles back, or the next stage on this Ray (e.g. another run's SFT) waits forever.
    ray.util.remove_placement_group(roles.placement_group)
