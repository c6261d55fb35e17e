"""Where each model of a run comes from: an explicit `*_model_path` field, else the stage's output in
save_dir (its sha256 manifest verified before anything reads it), else model_name. PPO's setup, the
reward and DPO stages and `rlhf-dist eval` all resolve through here, so they read the same models."""

from __future__ import annotations

import logging
import re
from pathlib import Path

from ..config import ConfigError
from ..config.stages import STAGES
from .checkpoint import MANIFEST, is_complete, safe_join, verify, warn_if_unfinished

log = logging.getLogger(__name__)

MODEL_PATH_FIELDS = ("policy_model_path", "reference_model_path", "reward_model_path", "critic_model_path")
# What transformers tries on the hub when a path is not a local directory: `name` or `org/name`.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


def model_path_errors(cfg) -> list[str]:
    """The model fields that cannot be read, one line each naming the field: a missing local directory, a
    file, a directory without config.json, or a hub id with the hub switched off. model_name counts where the
    policy starts from it (no policy_model_path); tokenizer_path may also be a tokenizer.json file."""
    errors = []
    for name in ("model_name", *MODEL_PATH_FIELDS) if cfg.policy_model_path is None else MODEL_PATH_FIELDS:
        value = getattr(cfg, name)
        if value is None:
            continue
        p = Path(value).expanduser()
        if p.is_dir():
            if not (p / "config.json").is_file():
                errors.append(f"{name}: {p.absolute()} is not a Hugging Face model directory (no config.json)")
        elif p.exists():
            errors.append(f"{name}: {p.absolute()} is a file, not a model directory")
        else:
            errors += _not_local(name, value, "directory")
    if cfg.tokenizer_path is not None and not Path(cfg.tokenizer_path).expanduser().exists():
        errors += _not_local("tokenizer_path", cfg.tokenizer_path, "directory or file")
    return errors


def _not_local(name: str, value: str, what: str) -> list[str]:
    """A path that does not exist: fine if it can be a hub id and the hub is on."""
    from huggingface_hub import constants  # deferred: loading huggingface_hub takes seconds

    p = Path(value).expanduser()
    # "models/tiny" where ./models exists is a local path with a typo, not the hub's org "models".
    if not _HUB_ID.fullmatch(value) or ".." in value or (p.parent != Path(".") and p.parent.is_dir()):
        return [f"{name}: {what} {p.absolute()} does not exist"]
    if constants.HF_HUB_OFFLINE:
        return [f"{name}: {value} is not a local directory, and the hub is off (HF_HUB_OFFLINE)"]
    return []


def check_model_paths(cfg) -> None:
    """Raise ConfigError naming every unreadable model field (one line when one); call before anything starts."""
    errors = model_path_errors(cfg)
    if len(errors) == 1:
        raise ConfigError(errors[0])
    if errors:
        raise ConfigError("model paths:\n  " + "\n  ".join(errors))


def verify_if_sealed(path: str) -> None:
    """A directory with a manifest (e.g. another run's best_model) is verified before it is read; plain
    HF directories and hub ids have none."""
    if (Path(path) / MANIFEST).is_file():
        verify(path)


def stage_model(cfg, sub: str, user: str) -> Path | None:
    """save_dir/<sub>/best_model when complete, its manifest verified first (CheckpointError naming a
    corrupted file); None when there is none."""
    p = safe_join(cfg.save_dir, sub, "best_model")
    if not is_complete(p):
        return None
    warn_if_unfinished(p, user)
    verify(p)
    return p


def policy_start(cfg, user: str) -> tuple[str, str]:
    """(model, why) of the policy's start: policy_model_path, else sft/best_model, else model_name."""
    if cfg.policy_model_path is not None:
        verify_if_sealed(cfg.policy_model_path)
        return cfg.policy_model_path, "policy_model_path"
    sft = stage_model(cfg, STAGES["sft"].out_dir, user)
    if sft is not None:
        return str(sft), "the SFT checkpoint"
    return cfg.model_name, "model_name (no SFT checkpoint in save_dir)"


def reference_model(cfg, policy: tuple[str, str]) -> tuple[str, str]:
    """(model, why) of the frozen reference: reference_model_path, else the policy's start `policy`."""
    if cfg.reference_model_path is not None:
        verify_if_sealed(cfg.reference_model_path)
        return cfg.reference_model_path, "reference_model_path"
    return policy[0], f"the policy's start: {policy[1]}"


def reward_model(cfg, user: str) -> tuple[str, str] | None:
    """(model, why) of the reward model: reward_model_path, else reward_model/best_model; None if neither."""
    if cfg.reward_model_path is not None:
        verify_if_sealed(cfg.reward_model_path)
        return cfg.reward_model_path, "reward_model_path"
    rm = stage_model(cfg, STAGES["reward"].out_dir, user)
    return (str(rm), "the reward stage") if rm is not None else None
