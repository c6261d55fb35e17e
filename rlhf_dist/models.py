"""Load and save the four kinds of model from Hugging Face directories.

- policy / reference: `AutoModelForCausalLM`;
- reward / critic: `AutoModelForSequenceClassification(num_labels=1)`, read per token through the
  backbone and its `score` head, so the reward is taken at the last real token found from the
  attention mask (never by searching for pad_token_id, which fails when pad == eos).

Weights are loaded with `use_safetensors=True`: a directory that only has pickled `.bin` weights is
refused, and nothing a user hands us is ever unpickled.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

log = logging.getLogger(__name__)


class ModelError(ValueError):
    pass


def resolve_device(device: str, cluster_gpus: float | None = None) -> str:
    """`auto` -> cuda, then mps, then cpu. Logs the choice.

    With `cluster_gpus` (the Ray cluster's GPU count) CUDA is judged by the cluster, not by this
    process: a job's driver often runs on a head node without a GPU.
    """
    has_cuda = torch.cuda.is_available() if cluster_gpus is None else cluster_gpus > 0
    if device != "auto":
        if device == "cuda" and not has_cuda:
            raise ModelError("device: cuda requested but no CUDA device is visible"
                             + ("" if cluster_gpus is None else " in the Ray cluster"))
        if device == "mps" and not torch.backends.mps.is_available():
            raise ModelError("device: mps requested but MPS is not available")
        return device
    chosen = "cuda" if has_cuda else "mps" if torch.backends.mps.is_available() else "cpu"
    log.info("device auto -> %s", chosen)
    return chosen


def _check_dir(path: str) -> None:
    p = Path(path)
    if p.exists() and p.is_dir():
        names = {f.name for f in p.iterdir()}
        if not any(n.endswith(".safetensors") or n.endswith(".safetensors.index.json") for n in names) and \
                any(n.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt")) for n in names) and "config.json" in names:
            raise ModelError(f"{p}: only pickled weights found; convert them to safetensors (pickles are never loaded)")


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token_id is None:
        # A tokenizer without pad (Llama, GPT-2) still needs a pad id for batching; attention masks
        # decide what is real, so any id works. Say it instead of doing it silently.
        tok.pad_token = tok.eos_token
        log.info("tokenizer %s has no pad token; padding with eos (masks come from attention masks)", path)
    return tok


def _dtype(bf16: bool) -> torch.dtype:
    return torch.bfloat16 if bf16 else torch.float32


def load_causal_lm(path: str, bf16: bool = False):
    from transformers import AutoModelForCausalLM

    _check_dir(path)
    return AutoModelForCausalLM.from_pretrained(path, dtype=_dtype(bf16), use_safetensors=True)


def load_scalar_model(path: str, bf16: bool = False, pad_token_id: int | None = None):
    """A reward/critic model: a backbone plus a 1-output `score` head (new if `path` is a causal LM)."""
    import transformers
    from transformers import AutoModelForSequenceClassification

    _check_dir(path)
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # "score.weight newly initialized" is expected here
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=1, dtype=_dtype(bf16), use_safetensors=True)
    finally:
        transformers.logging.set_verbosity(verbosity)
    if pad_token_id is not None and model.config.pad_token_id is None:
        model.config.pad_token_id = pad_token_id
    if not hasattr(model, "score"):
        raise ModelError(f"{path}: {type(model).__name__} has no `score` head")
    return model


def backbone(model):
    return getattr(model, model.base_model_prefix)


def token_scalars(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Per-token scalar outputs of a reward/critic model: (B, T) -> (B, T)."""
    position_ids = position_ids_from_mask(attention_mask)  # (B, T)
    hidden = backbone(model)(input_ids=input_ids, attention_mask=attention_mask,
                             position_ids=position_ids, use_cache=False).last_hidden_state  # (B, T, H)
    return model.score(hidden).squeeze(-1).float()  # (B, T)


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token of each row, for left or right padding: (B, T) -> (B,)."""
    T = attention_mask.shape[1]
    pos = torch.arange(T, device=attention_mask.device).expand_as(attention_mask)  # (B, T)
    return (pos * attention_mask.long()).argmax(-1)


def sequence_scores(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Reward model score at the last real token: (B, T) -> (B,)."""
    values = token_scalars(model, input_ids, attention_mask)  # (B, T)
    idx = last_token_index(attention_mask)  # (B,)
    return values.gather(1, idx[:, None]).squeeze(1)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding, the same in generation and in scoring: (B, T) -> (B, T)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def save_hf(model, tokenizer, out_dir: str | os.PathLike, state_dict: dict | None = None) -> None:
    """An HF-format directory: safetensors weights, config, generation config, tokenizer."""
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir, safe_serialization=True, state_dict=state_dict)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
