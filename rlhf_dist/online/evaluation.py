"""Held-out evaluation during online training (`eval_every`): generate on held-out prompts with the current
weights, score them and measure the KL to the reference. No update, no state: the same seed every time,
so the curve shows the policy's change, not the sampling noise of new prompts."""

from __future__ import annotations

import torch

from ..algo import Outcome
from ..data.encode import tokenize_prompts
from ..data.read import read_dataset
from ..data.sources import data_spec
from ..evaluation.evaluate import resolve_eval_data
from ..rewards.base import merge_outputs
from ..roles.calls import wait
from ..rollout.samples import merge_samples, slice_samples
from .rewards import reward_metrics
from .setup import split


def load_eval_prompts(cfg, tok) -> tuple[list[list[dict]], list[dict], list[list[int]]]:
    """The first eval_num_prompts held-out prompts: (messages, their rows' other fields, token ids). Over-long
    ones keep their end."""
    path = resolve_eval_data(cfg, cfg.eval_data_path)
    rows, stats = read_dataset(data_spec(cfg, "eval_data_path", "prompt", path), "prompt", cfg.bad_rows,
                               cfg.max_bad_fraction)
    rows = rows[:cfg.eval_num_prompts]
    return [r.prompt for r in rows], [r.fields for r in rows], tokenize_prompts(tok, rows, cfg.max_length - cfg.gen_max_new_tokens, True, stats)


def held_out_metrics(roles, cfg, prompts: list[list[dict]], metadata: list[dict], prompt_ids: list[list[int]], tok,
                     seed: int) -> dict:
    """`eval/*` figures of the current weights on the held-out prompts (rollout, reference and reward roles).
    Rewards are means over the samples scored; failures are counted (`eval/reward_failed*`), not fatal."""
    T = cfg.call_timeout_s
    ids = list(range(len(prompt_ids)))
    refs = [a.generate.remote([prompt_ids[i] for i in ids[s:e]], ids[s:e], seed + k, tok.pad_token_id, tok.eos_token_id)
            for k, (a, (s, e)) in enumerate(zip(roles.rollout, split(len(ids), len(roles.rollout))))]
    samples = merge_samples(wait(refs, "rollout", "eval", T), tok.pad_token_id)

    def fan(group, call):
        return [call(a, s, e) for a, (s, e) in zip(group, split(len(samples), len(group)))]

    r_ref = fan(roles.reference, lambda a, s, e: a.logprobs.remote(slice_samples(samples, s, e)))
    r_rew = fan(roles.reward, lambda a, s, e: a.score.remote(slice_samples(samples, s, e), *(
        [col[i] for i in samples.sample_ids[s:e]] for col in (prompts, metadata))))
    rew = merge_outputs(wait(r_rew, "reward", "eval", T))
    ok = rew.outcome == Outcome.OK  # (B,)
    mask = samples.action_mask  # (B, R)
    out = {"eval/reward_mean": float(rew.score[ok].mean()) if ok.any() else None,
           "eval/response_length": float(mask.sum(1).float().mean()), **reward_metrics(rew, ok, "eval/")}
    if r_ref:  # k1 summed over each response: the sampled estimate of KL(policy || reference) per sequence
        ref = torch.cat(wait(r_ref, "reference", "eval", T))  # (B, R)
        out["eval/kl"] = float(((samples.rollout_logprobs - ref) * mask).sum(1).mean())
    return out
