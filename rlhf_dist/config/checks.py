"""Cross-field checks of a parsed config: each returns the errors it finds, naming the fields. Nothing here
changes a value."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from .algorithms import ALGORITHMS
from .engines import ENGINES, installed_engines
from .rewards import REWARD_SOURCES, active_sources
from .stages import OFFLINE, ONLINE, STAGES, micro_batch_size

# Fields of the critic; setting one with a critic-free algorithm is an error.
CRITIC_FIELDS = ("critic_init", "critic_model_path", "ppo_lr_value", "ppo_value_clip_range", "ppo_lam", "ppo_whiten_advantages", "roles.critic")


def _dotted(obj: Any, name: str) -> Any:
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj



def config_errors(cfg) -> list[str]:
    """Every cross-field problem of `cfg`, one line each naming the field."""
    errors = []
    if not cfg.model_name.strip():
        errors.append("model_name: must not be empty")
    for stage in OFFLINE:
        f = stage.fields
        batch, workers = getattr(cfg, f.batch), getattr(cfg, f.workers)
        micro = micro_batch_size(cfg, stage, workers)
        if micro == 0 or batch % (micro * workers):
            errors.append(f"{f.batch}: {batch} is not a multiple of {f.micro_batch} ({micro}) x {f.workers} "
                          f"({workers})")
    for f in (s.fields for s in STAGES.values()):
        if getattr(cfg, f.max_tokens) and getattr(cfg, f.micro_batch):
            errors.append(f"{f.max_tokens}: set it (packed micro-batches) or {f.micro_batch} (padded ones), "
                          "not both")
    errors += stage_errors(cfg)
    samples = cfg.ppo_batch_size * cfg.n_samples_per_prompt
    if samples % cfg.ppo_mini_batch_size:
        errors.append(f"ppo_mini_batch_size: ppo_batch_size ({cfg.ppo_batch_size}) x n_samples_per_prompt "
                      f"({cfg.n_samples_per_prompt}) = {samples} samples is not a multiple of {cfg.ppo_mini_batch_size}")
    errors += algorithm_errors(cfg)
    for role in ("policy", "critic") if ALGORITHMS[cfg.algorithm].critic else ("policy",):
        n = getattr(cfg.roles, role).num_workers
        micro = micro_batch_size(cfg, ONLINE, n)
        if micro == 0 or cfg.ppo_mini_batch_size % (micro * n):
            errors.append(
                f"ppo_mini_batch_size: {cfg.ppo_mini_batch_size} is not a multiple of "
                f"ppo_micro_batch_size ({micro}) x roles.{role}.num_workers ({n})"
            )
    if cfg.gen_min_new_tokens > cfg.gen_max_new_tokens:
        errors.append(f"gen_min_new_tokens: {cfg.gen_min_new_tokens} must be <= gen_max_new_tokens "
                      f"({cfg.gen_max_new_tokens})")
    if cfg.gen_max_new_tokens >= cfg.max_length:
        errors.append(f"gen_max_new_tokens: {cfg.gen_max_new_tokens} must be < max_length ({cfg.max_length})")
    errors += reward_source_errors(cfg)
    if ".." in Path(cfg.save_dir).parts:
        errors.append(f"save_dir: {cfg.save_dir!r} must not contain '..'")
    for name in ("name", "group"):
        v = getattr(cfg.wandb, name)
        if v is not None and (v in (".", "..") or re.search(r"[/\\\x00]", v)):
            errors.append(f"wandb.{name}: {v!r} must be a plain name, without '/' or '..'")
    if cfg.bf16 is True and cfg.device in ("cpu", "mps"):
        errors.append(f"bf16: true needs a CUDA GPU, but device is {cfg.device}; use auto or false")
    if cfg.critic_model_path is not None and cfg.critic_init != "sft":
        errors.append(f"critic_init: {cfg.critic_init} is not used when critic_model_path is set; unset one")
    if cfg.ppo_recompute_old_logprobs is True and cfg.ppo_overlap_rollout:
        errors.append("ppo_recompute_old_logprobs: true removes ppo_overlap_rollout's off-policy correction (the "
                      "rollout's logprobs carry the one-step lag); use one or the other")
    if cfg.safety_filter is None:
        defaults = type(cfg)(model_name="x")  # the schema's defaults (importing it would be a cycle)
        errors += [f"{name}: only used with a safety_filter" for name in ("safety_action", "safety_penalty")
                   if getattr(cfg, name) != getattr(defaults, name)]
    errors += lora_errors(cfg)
    errors += learner_option_errors(cfg)
    errors += rollout_engine_errors(cfg)
    return errors


def rollout_engine_errors(cfg) -> list[str]:
    """An engine that cannot start here, and vLLM settings that cannot apply, before any stage starts."""
    errors = []
    engine = ENGINES.get(cfg.rollout_engine)
    if engine and engine.name not in installed_engines():
        errors.append(f"rollout_engine: {engine.name}, but {engine.label} is not installed here; {engine.install}")
    tp, gpus = cfg.vllm_tensor_parallel_size, cfg.roles.rollout.num_gpus
    if tp > 1 and cfg.rollout_engine == "hf":
        errors.append(f"vllm_tensor_parallel_size: {tp} needs rollout_engine vllm (or auto on GPUs), not hf")
    elif tp > 1 and gpus != tp:
        errors.append(f"vllm_tensor_parallel_size: {tp} shards each vLLM engine over {tp} GPUs, so "
                      f"roles.rollout.num_gpus must be {tp}, not {gpus:g}")
    return errors


def learner_option_errors(cfg) -> list[str]:
    """attn_implementation and offload_optimizer settings that cannot run; found before any model loads."""
    errors = []
    if cfg.attn_implementation == "flash_attention_2":  # flash_attn's import is checked where models load
        if cfg.device in ("cpu", "mps"):
            errors.append(f"attn_implementation: flash_attention_2 needs a CUDA GPU, but device is {cfg.device}; "
                          "use sdpa")
        elif cfg.bf16 is False:
            errors.append("attn_implementation: flash_attention_2 runs only in bf16 or fp16, but bf16 is false; "
                          "use sdpa, or bf16: auto")
    if cfg.offload_optimizer and cfg.zero_stage == 0:
        errors.append("offload_optimizer: true needs zero_stage >= 1 (ZeRO owns the optimizer states it "
                      "offloads), but zero_stage is 0")
    return errors


def lora_errors(cfg) -> list[str]:
    """LoRA settings that cannot work together with the rest of the config."""
    if not cfg.lora_rank:
        defaults = type(cfg)(model_name="x")  # the schema's defaults (importing it would be a cycle)
        return [f"{name}: only used with lora_rank > 0 (LoRA is off at lora_rank 0)"
                for name in ("lora_alpha", "lora_dropout", "lora_target_modules")
                if getattr(cfg, name) != getattr(defaults, name)]
    errors = []
    if cfg.zero_stage == 3:  # the weight sync and the saves merge adapters into whole (not partitioned) weights
        errors.append(f"zero_stage: 3 is not supported with lora_rank {cfg.lora_rank}; use zero_stage 2 or less")
    if cfg.freeze_reward_backbone:
        errors.append(f"freeze_reward_backbone: true trains only the score head, lora_rank {cfg.lora_rank} adds "
                      "adapters to the backbone; use one or the other")
    if cfg.reference_model_path is not None:
        errors.append(f"reference_model_path: with lora_rank {cfg.lora_rank} PPO's reference is the policy's own "
                      "base weights (adapters off); unset it")
    if cfg.lora_target_modules == []:
        errors.append("lora_target_modules: must not be empty")
    return errors


def algorithm_errors(cfg) -> list[str]:
    """Options that make no sense for the chosen online algorithm are errors naming the field."""
    errors, algo = [], ALGORITHMS[cfg.algorithm]
    defaults = type(cfg)(model_name="x")  # the schema's defaults, without importing it (it imports this module)
    if cfg.n_samples_per_prompt < algo.min_samples:
        errors.append(f"n_samples_per_prompt: {algo.name} needs {algo.min_samples} or more samples per prompt, got "
                      f"{cfg.n_samples_per_prompt}")
    if cfg.kl_in not in algo.kl_in:
        errors.append(f"kl_in: {cfg.kl_in} is not allowed with algorithm: {algo.name} ({', '.join(algo.kl_in)})")
    if not algo.critic:
        critics = ", ".join(a.name for a in ALGORITHMS.values() if a.critic)
        for name in CRITIC_FIELDS:  # a value other than the default was set for a critic nobody starts
            if _dotted(cfg, name) != _dotted(defaults, name):
                errors.append(f"{name}: only used with algorithm: {critics} (a critic); {algo.name} starts none")
    for other in (a for a in ALGORITHMS.values() if a is not algo):
        for name in other.own_fields:
            if _dotted(cfg, name) != _dotted(defaults, name):
                errors.append(f"{name}: only used with algorithm: {other.name}, not {algo.name}")
    if cfg.kl_in == "reward" and cfg.kl_estimator not in (None, "k1"):
        errors.append(f"kl_estimator: {cfg.kl_estimator} in the reward gives a biased KL gradient; use k1 "
                      "(or leave it unset), or kl_in: loss")
    if cfg.kl_in == "loss" and cfg.kl_estimator == "k1":
        errors.append("kl_estimator: k1 as a loss term has zero expected gradient; use k3 or k2 (or leave it unset)")
    return errors


def stage_errors(cfg) -> list[str]:
    if cfg.stages is None:
        return []
    st = list(cfg.stages)
    if not st:
        return ["stages: must not be empty (unset it for the default sft, reward, ppo)"]
    dup = sorted({s for s in st if st.count(s) > 1})
    if dup:
        return [f"stages: {', '.join(dup)} listed more than once"]
    errors = []
    if "sft" in st and st[0] != "sft":
        errors.append(f"stages: sft must come first, the other stages start from its best model; got {st}")
    if ("ppo" in st and cfg.reward_model_weight != 0 and "reward" not in st[:st.index("ppo")]
            and cfg.reward_model_path is None):
        errors.append(f"stages: ppo scores with the reward model (reward_model_weight "
                      f"{cfg.reward_model_weight:g}), so reward must come before ppo; got {st} "
                      "(or set reward_model_path, or reward_model_weight: 0)")
    return errors


def reward_source_errors(cfg) -> list[str]:
    """At least one reward source on; reward_fn and reward_url well-formed (`config/rewards.py`)."""
    errors = []
    if not active_sources(cfg):
        off = ", ".join(f"{s.weight} {s.weight_of(cfg):g}" if s.switch is None or getattr(cfg, s.switch)
                        else f"{s.switch} unset" for s in REWARD_SOURCES.values())
        errors.append(f"reward_model_weight: no reward source is on ({off}), so PPO has no reward")
    if cfg.reward_fn and not re.fullmatch(r"[\w.]+:\w+", cfg.reward_fn):
        errors.append(f"reward_fn: {cfg.reward_fn!r} is not of the form module:function")
    if cfg.reward_url and not re.fullmatch(r"env:[A-Za-z_]\w*|https?://\S+", cfg.reward_url):
        # Not quoted: a URL given in the config may hold a token.
        errors.append("reward_url: expected an http:// or https:// URL, or env:NAME (an environment variable)")
    return errors
