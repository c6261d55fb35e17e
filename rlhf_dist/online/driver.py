"""The driver of every online algorithm (ppo, grpo, rloo, reinforce_pp). One iteration reads as the data
flow, with the same phase names in the code, the timers and the metrics:
rollout -> experience -> advantages -> learner -> sync -> checkpoint. The algorithms differ only in the
advantages (`algo.advantages_for`) and in whether a critic is started.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..algo import AdaptiveKLController, FixedKLController, RunningMoments
from ..config import RLHFConfig
from ..data.prompts import open_prompts
from ..data.sources import data_spec
from ..io.checkpoint import atomic_dir, complete_iterations, remove_stale_temps, safe_join, verify
from ..io.tracking import MetricsWriter, Timers, truncate_metrics
from ..models.load import load_tokenizer
from ..models.precision import recompute_old_logprobs
from ..rewards.base import merge_outputs
from ..roles.calls import wait
from ..roles.placement import ROLES
from ..rollout.samples import merge_samples, slice_samples
from ..runtime.errors import RoleFailure
from .evaluation import held_out_metrics, load_eval_prompts
from .experience import experience_stats, make_experience, process_scores
from .health import BadStepCounter, DriftGuard, HealthError, SpikeDetector, logprob_tolerance, nonfinite_rows
from .prompts import PromptSampler, sample_ids_for
from .recovery import dead_actors
from .rewards import check_failures, kept_for, reward_metrics
from .safety import SafetyCheck
from .setup import Roles, join_weight_sync, resolve_inputs, save_iteration, split, start_roles, stop_roles, sync_weights

log = logging.getLogger(__name__)


@dataclass
class Ahead:
    """The next iteration's rollout, started before this iteration's update (`ppo_overlap_rollout`)."""

    it: int
    ids: list[int]
    refs: list
    samples: object = None  # the merged Samples, once awaited


class LearnerLost(RuntimeError):
    """A policy or critic learner died: its optimizer state is gone, so the run reloads a checkpoint."""


def run_ppo(cfg: RLHFConfig, device: str) -> Path:
    """PPO from the last complete iteration checkpoint (or the start). A dead learner makes it reload
    that checkpoint and go on, at most `max_learner_restarts` times."""
    ppo_dir = safe_join(cfg.save_dir, "ppo")
    ppo_dir.mkdir(parents=True, exist_ok=True)
    reloads = actor_restarts = 0
    while True:
        remove_stale_temps(ppo_dir)
        run = PPORun(cfg, device, ppo_dir, reloads, actor_restarts)
        try:
            return run.train()
        except HealthError as e:
            log.error("ppo: stopped: %s", e)
            raise
        except LearnerLost as e:
            actor_restarts = run.actor_restarts
            if reloads >= cfg.max_learner_restarts:
                raise RoleFailure(f"{e}; gave up after {reloads} learner restarts (max_learner_restarts)") from e
            reloads += 1
            log.warning("ppo: %s; reloading the last complete checkpoint (learner restart %d of %d)", e, reloads,
                        cfg.max_learner_restarts)


class PPORun:
    """One attempt at the PPO stage: resume state, the roles, and the iteration loop."""

    def __init__(self, cfg: RLHFConfig, device: str, ppo_dir: Path, learner_restarts: int = 0, actor_restarts: int = 0):
        self.t_start = time.perf_counter()
        self.cfg, self.device, self.dir = cfg, device, ppo_dir
        self.learner_restarts, self.actor_restarts = learner_restarts, actor_restarts
        done = complete_iterations(ppo_dir)
        self.resume_from = done[-1] if done else None
        state = {}
        if self.resume_from is not None:
            verify(self.resume_from)
            state = json.loads((self.resume_from / "state.json").read_text())
            log.info("ppo: resuming from %s (iteration %d)", self.resume_from, state["iteration"])
        self.start_it = state.get("iteration", 0)
        # Rows after the checkpoint are redone; drop them so every iteration is in the log once.
        for name in ("metrics.jsonl", "samples.jsonl"):
            truncate_metrics(ppo_dir / name, "iteration", self.start_it)
        self.inputs = resolve_inputs(cfg, self.resume_from)
        self.tok = load_tokenizer(self.inputs.tokenizer)
        self.prompts, stats = open_prompts(data_spec(cfg, "ppo_data_path", "prompt"), self.tok,
                                           cfg.max_length - cfg.gen_max_new_tokens, cfg.truncate, cfg.bad_rows,
                                           cfg.max_bad_fraction)
        log.info("ppo: %d prompts (%s)", len(self.prompts), stats.summary())
        self.kl_ctl = (AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon) if cfg.kl_target
                       else FixedKLController(cfg.kl_coef))
        if "kl_ctl" in state:
            self.kl_ctl.load_state_dict(state["kl_ctl"])
        self.sampler = PromptSampler(len(self.prompts), cfg.seed, state.get("cursor", 0))
        self.version = state.get("version", 0)
        self.eval_prompts = load_eval_prompts(cfg, self.tok) if cfg.eval_every else None
        self.safety = SafetyCheck(cfg, self.prompts) if cfg.safety_filter else None
        self.moments = RunningMoments() if cfg.reward_normalize else None
        if self.moments is not None and "reward_moments" in state:
            self.moments.load_state_dict(state["reward_moments"])
        self.bad_steps = BadStepCounter(cfg.max_bad_steps)
        self.spikes = {k: SpikeDetector(cfg.grad_spike_factor) for k in ("policy", "critic")}
        self.roles: Roles | None = None
        self.ahead: Ahead | None = None

    # ------------------------------------------------------------------------------
    def train(self) -> Path:
        cfg = self.cfg
        steps_per_it = cfg.ppo_epochs * (cfg.ppo_batch_size * cfg.n_samples_per_prompt // cfg.ppo_mini_batch_size)
        metrics = MetricsWriter(self.dir / "metrics.jsonl")
        samples_log = MetricsWriter(self.dir / "samples.jsonl")
        try:
            self.roles = start_roles(cfg, self.device, self.inputs, cfg.ppo_iterations * steps_per_it)
            self.pids = {(i["role"], i["rank"]): i["pid"] for i in self.roles.info}
            self.recompute = self._recompute_setting()
            bf16 = any(i["bf16"] for i in self.roles.info if i["role"] in ("rollout", "policy"))
            self.drift = DriftGuard(logprob_tolerance(cfg.sync_logprob_tolerance, bf16), cfg.sync_max_drift_iterations)
            if self.resume_from is not None:  # verified above: optimizer states, then the rollout gets the weights
                for kind in ("policy", "critic"):
                    wait([a.load_state.remote(str(self.resume_from / f"{kind}_engine"))
                          for a in getattr(self.roles, kind)], kind, "setup", cfg.setup_timeout_s)
                self._retrying("sync", lambda: sync_weights(cfg, self.roles, self.version))
                log.info("ppo: resumed at iteration %d in %.1fs (roles started, states loaded, weights synced)",
                         self.start_it, time.perf_counter() - self.t_start)
            for it in range(self.start_it, cfg.ppo_iterations):
                rec, log_rows = self.iteration(it)
                metrics.write(rec)
                for row in log_rows:
                    samples_log.write(row)
            final = self.dir / "final_model"
            with atomic_dir(final) as tmp:
                self._wait([a.save.remote(str(tmp), self.inputs.tokenizer) for a in self.roles.policy], "policy",
                           "checkpoint")
                self._wait([a.save.remote(str(tmp / "critic"), self.inputs.tokenizer) for a in self.roles.critic],
                           "critic", "checkpoint")
                if cfg.lora_rank:  # beside each merged model, the adapters merged into it
                    for kind, sub in (("policy", "adapter"), ("critic", "critic/adapter")):
                        self._wait([a.save_adapter.remote(str(tmp / sub)) for a in getattr(self.roles, kind)], kind,
                                   "checkpoint")
            log.info("ppo: final model at %s", final)
            self._write_summary(metrics)  # reporting only: after the save, so it cannot cost the model
            return final
        except RoleFailure as e:
            lost = [f"{r}-{k}" for r, k in dead_actors(self.roles, self.pids, self.cfg.setup_timeout_s) if r in ("policy", "critic")] if self.roles else []
            if lost:
                raise LearnerLost(f"{', '.join(lost)} died ({e})") from e
            raise
        finally:
            metrics.close()
            samples_log.close()
            if self.roles is not None:
                stop_roles(self.roles)

    def _write_summary(self, metrics: MetricsWriter) -> None:
        """The summary row (run time, peak memory per role). Best effort: a failure here is logged, since
        the final model is already written and a dead frozen actor must not fail (or redo) the run."""
        try:
            peaks = self._wait([a.peak_memory_mb.remote() for r in ROLES for a in getattr(self.roles, r)], "all",
                               "summary")
            names = [f"{r}-{k}" for r in ROLES for k in range(len(getattr(self.roles, r)))]
            metrics.write({"summary": True, "seconds": time.perf_counter() - self.t_start,
                           "peak_memory_mb": dict(zip(names, peaks))})
            log.info("ppo: peak memory (MB) %s", " ".join(f"{n}={m:.0f}" for n, m in zip(names, peaks)))
        except Exception as e:  # noqa: BLE001
            log.warning("ppo: no summary row (peak memory): %s", e)

    def iteration(self, it: int) -> tuple[dict, list[dict]]:
        """rollout -> experience -> advantages -> learner -> sync -> checkpoint, with the health guards."""
        cfg = self.cfg
        timers = Timers()
        t_iter = time.perf_counter()
        ids = self.ahead.ids if self.ahead is not None else self.sampler.next(cfg.ppo_batch_size)
        # Rollout and experience change no state, so a restarted actor just means doing them again.
        samples, old_logp, values, ref_logp, rew = self._retrying("experience", lambda: self.collect(it, ids, timers))
        lag = self.version - samples.version  # updates between the rollout's weights and the learner's
        check_failures(rew, cfg.reward_max_failed_fraction, f"iteration {it + 1}")
        rewarded = kept_for(rew, cfg)  # (B,) the samples with a reward (with group advantages: whole groups)
        kept, raw, safety_rec, flagged_rows = rewarded, rew.score, {}, []  # (B,), (B,)
        if self.safety:  # penalize: raw lowered; drop: the flagged rollouts' groups leave `kept`
            raw, dropped, safety_rec, flagged_rows = self.safety(it, samples.sample_ids, raw, rew.responses)
            kept = rewarded & ~dropped
        with timers.phase("advantages"):
            scores = process_scores(raw, samples, cfg, self.tok.eos_token_id, self.moments, kept)  # (B,)
            exp = make_experience(samples, old_logp, ref_logp, values, scores, cfg, self.kl_ctl.value, kept)
            est = experience_stats(exp, kept)
        rec: dict = {"iteration": it + 1, "algorithm": cfg.algorithm, **safety_rec}
        if cfg.kl_max is not None and est["kl"] > cfg.kl_max:
            raise HealthError(f"ppo: KL {est['kl']:.4f} > kl_max {cfg.kl_max} at iteration {it + 1}; stopping. "
                              f"Last good checkpoint: {self._last_checkpoint()}")
        pstats, cstats = self.update(it, exp, est["kl"], timers, rec)
        with timers.phase("checkpoint"):
            if (it + 1) % cfg.save_interval == 0 or it + 1 == cfg.ppo_iterations:
                self.save(it)
        if self.eval_prompts and ((it + 1) % cfg.eval_every == 0 or it + 1 == cfg.ppo_iterations):
            with timers.phase("eval"):  # the weights just synced: the rollout holds the updated policy
                rec.update(self._retrying("eval", lambda: held_out_metrics(
                    self.roles, cfg, *self.eval_prompts, self.tok, cfg.seed * 100003 + 99991)))
        seconds = time.perf_counter() - t_iter
        rec.update({**est, "kl_coef": self.kl_ctl.value, "score_raw_mean": float(rew.score[kept].mean()) if kept.any() else None,
                    **{k: pstats[k] for k in ("policy_loss", "clip_frac", "approx_kl", "entropy", "grad_norm", "kl_loss",
                                              "first_ratio_mean", "first_ratio_dev_max") if k in pstats},
                    "value_loss": cstats.get("value_loss"), "value_clip_frac": cstats.get("value_clip_frac"),
                    "critic_grad_norm": cstats.get("grad_norm"),
                    "weight_version": self.version, "rollout_version": samples.version,
                    "rollout_lag": lag,
                    "actor_restarts": self.actor_restarts, "learner_restarts": self.learner_restarts,
                    "bad_steps": self.bad_steps.total, "seconds": seconds,
                    "tokens_per_s": float(samples.action_mask.sum()) / seconds, "samples_per_s": len(samples) / seconds,
                    **{f"time/{k}": v for k, v in timers.seconds.items()}})
        if self.recompute:  # the rollout's weights are the learner's: a broken sync shows here
            rec["rollout_logprob_diff"] = float(((samples.rollout_logprobs - old_logp).abs() * samples.action_mask).max())
        self._check_drift(it, rec, lag)
        rec.update(reward_metrics(rew, rewarded))  # safety drops are counted apart (safety/dropped)
        log.info("ppo: iteration %d/%d reward %.3f kl %.4f policy_loss %.4f value_loss %.4f len %.1f %.2fs (%s)",
                 it + 1, cfg.ppo_iterations, est["reward_mean"], est["kl"], rec.get("policy_loss") or 0.0,
                 rec.get("value_loss") or 0.0, est["response_length"], seconds,
                 " ".join(f"{k}={v:.2f}" for k, v in timers.seconds.items()))
        return rec, self._sample_rows(it, exp, rew.responses, kept) + flagged_rows

    def _check_drift(self, it: int, rec: dict, lag: int) -> None:
        """The sync's end-to-end check (`health.DriftGuard`): the rollout's log-probs against the learner's,
        from the recomputed old log-probs, or from the first mini-batch's ratio when the iteration was
        on-policy (with a lagged rollout the ratio is meant to differ from 1)."""
        diff = rec.get("rollout_logprob_diff") if self.recompute else (
            rec.get("first_ratio_dev_max") if lag == 0 else None)
        if diff is not None and self.drift.record(diff, it + 1):
            log.warning("ppo: iteration %d: the rollout's log-probs differ from the learner's by %.3g (> %g)",
                        it + 1, diff, self.drift.tolerance)

    def update(self, it: int, exp, kl: float, timers: Timers, rec: dict) -> tuple[dict, dict]:
        """The learner and sync phases, unless the experience has non-finite values (then the update is skipped)."""
        cfg = self.cfg
        bad = nonfinite_rows(scores=exp.scores, advantages=exp.advantages, returns=exp.returns,
                             old_logprobs=exp.old_logprobs, ref_logprobs=exp.ref_logprobs, values=exp.values)
        if bad or not exp.action_mask.any():
            why = ("non-finite " + ", ".join(f"{k} (sample ids {[exp.sample_ids[i] for i in v]})" for k, v in bad.items())
                   if bad else "no sample has a reward")
            log.warning("ppo: iteration %d: %s; update skipped", it + 1, why)
            rec["skipped"] = 1
            self.bad_steps.record(True, why)
            return {}, {}
        with timers.phase("learner"):
            pstats, cstats = self.learn(exp, cfg.seed * 7919 + it)
        self.check_learners(it, pstats, cstats, rec)
        self.version = pstats["version"]
        with timers.phase("rollout"):  # the part of the next rollout that the update did not hide
            self._await_ahead()
        with timers.phase("sync"):
            rec["sync_bytes"] = self._retrying("sync", lambda: sync_weights(cfg, self.roles, self.version))
        self.kl_ctl.update(kl, cfg.ppo_batch_size)
        return pstats, cstats

    def save(self, it: int) -> None:
        save_iteration(self.cfg, self.roles, self.dir / f"iteration_{it + 1:06d}", self.inputs.tokenizer, {
            # A rollout started ahead is redone after a resume: its prompts are not consumed yet.
            "iteration": it + 1, "cursor": self.sampler.cursor - (len(self.ahead.ids) if self.ahead else 0),
            "version": self.version, "algorithm": self.cfg.algorithm, "kl_ctl": self.kl_ctl.state_dict(),
            **({"reward_moments": self.moments.state_dict()} if self.moments is not None else {})})

    def _sample_rows(self, it: int, exp, responses: list[str], kept: torch.Tensor) -> list[dict]:
        """A few generations for samples.jsonl (and W&B's table), with their sample and group ids (reward None:
        masked out, no reward)."""
        if it % self.cfg.wandb.sample_every and it + 1 != self.cfg.ppo_iterations:
            return []
        n = self.cfg.n_samples_per_prompt
        kl_seq = (exp.kl * exp.action_mask).sum(1)
        return [{"iteration": it + 1, "sample_id": sid, "group": sid // n,
                 "prompt": self.prompts[sid // n].prompt[-1]["content"], "response": responses[j],
                 "reward": float(exp.scores[j]) if kept[j] else None, "kl": float(kl_seq[j])}
                for j, sid in enumerate(exp.sample_ids[:max(4, n)])]

    def collect(self, it: int, ids: list[int], timers: Timers):
        """The rollout and experience phases: samples (started ahead, or now), then the forwards at once on
        their own actors. With ppo_overlap_rollout the next iteration's rollout starts here."""
        cfg, roles, n = self.cfg, self.roles, self.cfg.n_samples_per_prompt
        with timers.phase("rollout"):
            ahead, self.ahead = self.ahead, None  # taken: if its actor died, the retry generates afresh
            if ahead is not None and ahead.samples is not None:
                samples = ahead.samples
            else:
                samples = self._gather(ahead.refs if ahead is not None else self._launch(it, ids))
            if cfg.ppo_overlap_rollout and it + 1 < cfg.ppo_iterations:
                nxt = self.sampler.next(cfg.ppo_batch_size)
                self.ahead = Ahead(it + 1, nxt, self._launch(it + 1, nxt))
        with timers.phase("experience"):
            def fan(group, method):
                return [getattr(a, method).remote(slice_samples(samples, s, e))
                        for a, (s, e) in zip(group, split(len(samples), len(group)))]
            r_old = fan(roles.policy, "forward") if self.recompute else None
            r_val = fan(roles.critic, "forward") if roles.critic else None
            # LoRA: the policy learners give the reference's logprobs (their base weights), no reference actor.
            ref_role = "policy" if cfg.lora_rank else "reference"
            r_ref = fan(roles.policy, "reference_logprobs") if cfg.lora_rank else fan(roles.reference, "logprobs")
            rows = [self.prompts[i // n] for i in samples.sample_ids]  # each sample's prompt row (prompt, fields)
            r_rew = [a.score.remote(slice_samples(samples, s, e), [r.prompt for r in rows[s:e]],
                                    [r.fields for r in rows[s:e]])
                     for a, (s, e) in zip(roles.reward, split(len(samples), len(roles.reward)))]
            old_logp = (torch.cat(self._wait(r_old, "policy", "experience")) if r_old is not None
                        else samples.rollout_logprobs)  # (B, R)
            values = torch.cat(self._wait(r_val, "critic", "experience")) if r_val else None  # (B, R)
            ref_logp = torch.cat(self._wait(r_ref, ref_role, "experience"))  # (B, R)
            rew = merge_outputs(self._wait(r_rew, "reward", "experience"))
        return samples, old_logp, values, ref_logp, rew

    def _launch(self, it: int, ids: list[int]) -> list:
        """Start the rollout of iteration `it`: the prompts split across the rollout workers."""
        tok, n = self.tok, self.cfg.n_samples_per_prompt
        sids = sample_ids_for(ids, n)  # each prompt n times, consecutive
        return [a.generate.remote([self.prompts.token_ids(i // n) for i in sids[s:e]], sids[s:e],
                                  self.cfg.seed * 100003 + it * 101 + k, tok.pad_token_id, tok.eos_token_id)
                for k, (a, (s, e)) in enumerate(zip(self.roles.rollout, split(len(sids), len(self.roles.rollout))))]

    def _gather(self, refs: list):
        return merge_samples(self._wait(refs, "rollout", "rollout"), self.tok.pad_token_id)

    def _await_ahead(self) -> None:
        """Finish the rollout started ahead before the weights change under it (the sync needs the rollout
        idle). A rollout worker that died meanwhile is restarted and the rollout redone on current weights."""
        ahead = self.ahead
        if ahead is None or ahead.samples is not None:
            return
        pending = [ahead.refs]
        ahead.samples = self._retrying("rollout", lambda: self._gather(
            pending.pop() if pending else self._launch(ahead.it, ahead.ids)))

    def learn(self, exp, seed: int) -> tuple[dict, dict]:
        """Policy and critic (if any) update at the same time; returns rank 0's statistics of each ({} for none)."""
        r_pol = [a.train.remote(exp, seed, self.kl_ctl.value) for a in self.roles.policy]
        r_cri = [a.train.remote(exp, seed) for a in self.roles.critic]
        pstats = self._wait(r_pol, "policy", "learner")
        cstats = self._wait(r_cri, "critic", "learner")
        for group in (pstats, cstats):  # sample ids with a non-finite loss, from every rank
            if group:
                group[0]["nonfinite_ids"] = sorted({i for s in group for i in s["nonfinite_ids"]})
        return pstats[0], (cstats[0] if cstats else {})

    def check_learners(self, it: int, pstats: dict, cstats: dict, rec: dict) -> None:
        """Skipped optimizer steps count as bad steps; non-finite weights stop the run; spikes raise an alarm."""
        why = []
        for kind, st in (("policy", pstats), ("critic", cstats)):
            if not st:  # no critic
                continue
            if not st["params_finite"]:
                raise HealthError(f"ppo: {kind} has non-finite parameters after iteration {it + 1}; stopping "
                                  f"without saving them. Last good checkpoint: {self._last_checkpoint()}")
            if st["skipped_steps"] or st["nonfinite_ids"]:
                why.append(f"{kind}: {st['skipped_steps']} optimizer steps skipped for a non-finite gradient norm, "
                           f"non-finite loss on sample ids {st['nonfinite_ids']}")
            median = self.spikes[kind].update(st["grad_norm"])
            if median is not None:
                log.warning("ppo: ALARM iteration %d: %s grad norm %.4g is %.1fx its running median %.4g", it + 1, kind,
                            st["grad_norm"], st["grad_norm"] / max(median, 1e-12), median)
                rec[f"{kind}_grad_spike"] = 1
        if why:
            log.warning("ppo: iteration %d: %s", it + 1, "; ".join(why))
            rec["skipped"] = 1
        self.bad_steps.record(bool(why), "; ".join(why))

    def _recompute_setting(self) -> bool:
        """Old logprobs from the learner or the rollout, from the precision each role actually runs in."""
        info = self.roles.info
        rollout_bf16 = any(i["bf16"] for i in info if i["role"] == "rollout")
        learner_bf16 = any(i["bf16"] for i in info if i["role"] == "policy")
        on = recompute_old_logprobs(self.cfg.ppo_recompute_old_logprobs, rollout_bf16, learner_bf16,
                                    self.cfg.ppo_overlap_rollout)
        log.info("ppo: old logprobs from the %s (ppo_recompute_old_logprobs: %s; rollout %s, policy learner %s)",
                 "policy learner" if on else "rollout", self.cfg.ppo_recompute_old_logprobs,
                 "bf16" if rollout_bf16 else "float32", "bf16" if learner_bf16 else "float32")
        return on

    # ------------------------------------------------------------------------------
    def _wait(self, refs, role: str, phase: str):
        return wait(refs, role, phase, self.cfg.call_timeout_s)

    def _last_checkpoint(self) -> str:
        done = complete_iterations(self.dir)
        return str(done[-1]) if done else "none (no iteration was saved yet)"

    def _retrying(self, phase: str, fn):
        """Run `fn`; when a restartable actor died under it, wait for Ray to restart it, restore it and run again."""
        for attempt in range(self.cfg.max_restarts + 1):
            try:
                return fn()
            except RoleFailure as e:
                t = time.perf_counter()
                dead = dead_actors(self.roles, self.pids, self.cfg.setup_timeout_s)
                if any(role in ("policy", "critic") for role, _ in dead):
                    raise LearnerLost(f"{'/'.join(f'{r}-{k}' for r, k in dead)} died during phase '{phase}'") from e
                if not dead or attempt == self.cfg.max_restarts:
                    raise
                self.actor_restarts += len(dead)
                if any(role == "rollout" for role, _ in dead):
                    # A restarted rollout worker holds its initial weights: rebuild the sync group, send the current ones.
                    join_weight_sync(self.cfg, self.roles)
                    sync_weights(self.cfg, self.roles, self.version)
                log.warning("ppo: %s restarted after dying during phase '%s' (actor restarts so far: %d; back in "
                            "%.1fs); redoing it", ", ".join(f"{r}-{k}" for r, k in dead), phase, self.actor_restarts,
                            time.perf_counter() - t)
