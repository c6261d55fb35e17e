"""Load and save the four kinds of model from Hugging Face directories.

- policy / reference: `AutoModelForCausalLM`;
- reward / critic: `AutoModelForSequenceClassification(num_labels=1)`, read per token from its `score`
  head (`token_scalars`), so the reward is taken at the last real token found from the attention mask
  (never by searching for pad_token_id, which fails when pad == eos).

Weights are loaded with `use_safetensors=True`: a directory that only has pickled `.bin` weights is
refused, and nothing a user hands us is ever unpickled.

LoRA (`apply_lora`, PEFT) wraps a trained model; `unwrap`, `merged_weights` and `save_hf` turn it back
into the plain HF model's weights (adapters merged) for the rollout, best_model and final_model.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import re
import sys
from pathlib import Path
from typing import Iterable, Iterator

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


# Files beside a tokenizer.json that name its special tokens and chat template (AutoTokenizer reads them).
_TOKENIZER_SIDE_FILES = ("tokenizer_config.json", "special_tokens_map.json")


def _tokenizer_from_file(path: Path):
    """A bare `tokenizer.json` (tokenizers' format). It names no eos/pad/bos nor a chat template: those come
    from the tokenizer_config.json / special_tokens_map.json (and chat_template.jinja) beside it, read by
    from_pretrained exactly as AutoTokenizer reads a directory, with this file as the vocabulary."""
    from transformers import PreTrainedTokenizerFast  # deferred: loading transformers takes seconds

    if any((path.parent / n).is_file() for n in _TOKENIZER_SIDE_FILES):
        return PreTrainedTokenizerFast.from_pretrained(str(path.parent), tokenizer_file=str(path))
    tok = PreTrainedTokenizerFast(tokenizer_file=str(path))
    if tok.eos_token_id is None:
        raise ModelError(f"tokenizer_path: {path} names no eos token (a tokenizer.json alone cannot); put its "
                         "tokenizer_config.json or special_tokens_map.json beside it")
    return tok


def load_tokenizer(path: str):
    """`path`: a tokenizer directory (AutoTokenizer) or a `tokenizer.json` file."""
    from transformers import AutoTokenizer  # deferred: loading transformers takes seconds

    tok = _tokenizer_from_file(Path(path)) if Path(path).is_file() else AutoTokenizer.from_pretrained(path)
    if tok.pad_token_id is None:
        # A tokenizer without pad (Llama, GPT-2) still needs a pad id for batching; attention masks
        # decide what is real, so any id works. Say it instead of doing it silently.
        tok.pad_token = tok.eos_token
        log.info("tokenizer %s has no pad token; padding with eos (masks come from attention masks)", path)
    return tok


def _dtype(bf16: bool) -> torch.dtype:
    return torch.bfloat16 if bf16 else torch.float32


ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")  # the config's attn_implementation


def check_attn_implementation(attn_implementation: str) -> None:
    """Refuse an unknown attention kernel, or flash_attention_2 without the flash-attn package, before a
    model loads (transformers would otherwise fail mid-load, or try to fetch a kernel from the hub)."""
    if attn_implementation not in ATTN_IMPLEMENTATIONS:
        raise ModelError(f"attn_implementation: {attn_implementation!r} is not one of {', '.join(ATTN_IMPLEMENTATIONS)}")
    if attn_implementation == "flash_attention_2":
        if importlib.util.find_spec("flash_attn") is None:
            raise ModelError("attn_implementation: flash_attention_2 needs the flash-attn package, which is not "
                             "importable in this process; use sdpa")


def load_causal_lm(path: str, bf16: bool = False, attn_implementation: str = "sdpa"):
    from transformers import AutoModelForCausalLM  # deferred: loading transformers takes seconds

    _check_dir(path)
    check_attn_implementation(attn_implementation)
    return AutoModelForCausalLM.from_pretrained(path, dtype=_dtype(bf16), use_safetensors=True,
                                                attn_implementation=_kernel(attn_implementation))


def _kernel(attn_implementation: str) -> str:
    """What transformers loads for the config's attn_implementation: sdpa as `attention.VARLEN_SDPA` (the
    same, plus sequence boundaries for packed rows)."""
    from .attention import register  # deferred: attention loads torch's varlen kernels and with them torch._dynamo

    return register() if attn_implementation == "sdpa" else attn_implementation


def load_scalar_model(path: str, bf16: bool = False, pad_token_id: int | None = None,
                      attn_implementation: str = "sdpa"):
    """A reward/critic model: a backbone plus a 1-output `score` head (new if `path` is a causal LM)."""
    import transformers  # deferred: loading transformers takes seconds
    from transformers import AutoModelForSequenceClassification  # deferred: loading transformers takes seconds

    _check_dir(path)
    check_attn_implementation(attn_implementation)
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # "score.weight newly initialized" is expected here
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=1, dtype=_dtype(bf16), use_safetensors=True, attn_implementation=_kernel(attn_implementation))
    finally:
        transformers.logging.set_verbosity(verbosity)
    if pad_token_id is not None and model.config.pad_token_id is None:
        model.config.pad_token_id = pad_token_id
    if not hasattr(model, "score"):
        raise ModelError(f"{path}: {type(model).__name__} has no `score` head")
    return model


def enable_gradient_checkpointing(model) -> None:
    """Recompute each decoder layer's activations in backward (the config's gradient_checkpointing), on the
    plain HF model before any LoRA wrap. Non-reentrant checkpointing needs no input that requires grad, so a
    LoRA model (frozen embeddings) gets its adapters' gradients too, and the gradients equal those without."""
    model = unwrap(model)
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # newer transformers; the old name warns there
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def is_checkpointing(model) -> bool:
    """Whether `enable_gradient_checkpointing` is on for `model` (either transformers name of the flag)."""
    model = unwrap(model)
    flag = "is_activation_checkpointing" if hasattr(type(model), "is_activation_checkpointing") else \
        "is_gradient_checkpointing"
    return bool(getattr(model, flag))


def backbone(model):
    return getattr(model, model.base_model_prefix)


def token_scalars(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, packed=None) -> torch.Tensor:
    """Per-token scalar outputs of a reward/critic model: (B, T) -> (B, T). `packed`: the forward runs
    over the batch's packed layout (`packing.Packed`).

    The forward goes through the root module (a LoRA wrapper included): ZeRO-3 starts each step of its
    parameter prefetch trace in the root's forward pre-hook, so a call to the backbone and the head alone
    would leave the trace invalid for good. The root's output pools the scores to one per row; the per-token
    ones are read from the `score` head's own call inside it."""
    from .packing import forward, padded  # deferred: packing loads attention (torch._dynamo, seconds)

    scores = []
    hook = unwrap(model).score.register_forward_hook(lambda _module, _args, out: scores.append(out))
    try:
        forward(model, input_ids, attention_mask, packed)
    finally:
        hook.remove()
    (out,) = scores  # (rows, T, 1)
    return padded(out.squeeze(-1).float(), packed)  # (B, T)


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token of each row, for left or right padding: (B, T) -> (B,)."""
    T = attention_mask.shape[1]
    pos = torch.arange(T, device=attention_mask.device).expand_as(attention_mask)  # (B, T)
    return (pos * attention_mask.long()).argmax(-1)


def sequence_scores(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, packed=None) -> torch.Tensor:
    """Reward model score at the last real token: (B, T) -> (B,)."""
    values = token_scalars(model, input_ids, attention_mask, packed)  # (B, T)
    idx = last_token_index(attention_mask)  # (B,)
    return values.gather(1, idx[:, None]).squeeze(1)


def save_hf(model, tokenizer, out_dir: str | os.PathLike, state_dict: dict | None = None) -> None:
    """An HF-format directory: safetensors weights, config, generation config, tokenizer. A LoRA model is
    saved as its plain HF model, adapters merged (`hf_state_dict`)."""
    out_dir = Path(out_dir)
    if state_dict is None and is_lora(model):
        state_dict = hf_state_dict(model)
    unwrap(model).save_pretrained(out_dir, safe_serialization=True, state_dict=state_dict)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)


# ---------------------------------------------------------------------------------------
# LoRA (PEFT)
# ---------------------------------------------------------------------------------------

def apply_lora(model, rank: int, alpha: float, dropout: float, target_modules: str | Iterable[str],
               modules_to_save: list[str] | None = None):
    """`model` wrapped with fresh LoRA adapters: only they and `modules_to_save` (trained in full, e.g. a
    reward model's `score` head) require grad. PEFT starts B at zero, so the model starts as the base."""
    from peft import LoraConfig, get_peft_model  # deferred: loading peft takes seconds

    targets = target_modules if isinstance(target_modules, str) else list(target_modules)
    return get_peft_model(model, LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets,
                                            modules_to_save=modules_to_save))


def load_lora(model, adapter_dir: str | os.PathLike):
    """`model` wrapped with the trained adapters of `adapter_dir` (PEFT's `save_pretrained`), trainable."""
    from peft import PeftModel  # deferred: loading peft takes seconds

    return PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=True)


def load_causal_lm_or_adapter(path: str, bf16: bool, base: str, attn_implementation: str = "sdpa"):
    """A causal LM directory, or a LoRA adapter directory (a LoRA run's PPO iteration) merged onto `base`."""
    if not (Path(path) / "adapter_config.json").is_file():
        return load_causal_lm(path, bf16, attn_implementation)
    return load_lora(load_causal_lm(base, bf16, attn_implementation), path).merge_and_unload()


def is_lora(model) -> bool:
    peft = sys.modules.get("peft")  # no PEFT model exists before peft is imported: don't import it (1.6 s)
    return peft is not None and isinstance(model, peft.PeftModel)


def unwrap(model):
    """The HF model inside a PEFT wrapper (with its LoRA layers), else `model`."""
    return model.get_base_model() if is_lora(model) else model


def adapters_off(model):
    """Context in which a LoRA model computes as its base model (the reference); a no-op without LoRA."""
    return model.disable_adapter() if is_lora(model) else contextlib.nullcontext()


_SAVED_COPY = re.compile(r"\.modules_to_save\.[^.]+\.")  # score.modules_to_save.default.weight -> score.weight


def merged_weights(model, named: Iterable[tuple[str, torch.Tensor]] | None = None,
                   merge: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
    """A LoRA model's weights under the plain base model's names, in its order: each adapted weight as
    W + B @ A * alpha / r (a new tensor), each `modules_to_save` module's trained copy, the rest as they are.
    `named`: (name, tensor) of the inner HF model, default its named_parameters() (a `state_dict().items()`
    for a save). merge=False: the base weights instead of merged ones (same names, shapes and dtypes)."""
    base = unwrap(model)
    for name, t in base.named_parameters() if named is None else named:
        if ".lora_" in name or ".original_module." in name:
            continue  # the adapter factors; the frozen original of a modules_to_save module
        name = _SAVED_COPY.sub(".", name)
        owner, sep, leaf = name.rpartition(".base_layer.")
        if sep:
            name = f"{owner}.{leaf}"
            if merge and leaf == "weight":
                t = _merged(base.get_submodule(owner), t)
        yield name, t.detach()


@torch.no_grad()
def _merged(layer, weight: torch.Tensor) -> torch.Tensor:
    """W + each active adapter's delta (PEFT's own B @ A * scale, transposed where the layer stores W^T)."""
    return weight + sum(layer.get_delta_weight(a) for a in layer.active_adapters).to(weight.dtype)


def hf_state_dict(model) -> dict[str, torch.Tensor]:
    """The state dict of the plain HF model: a LoRA model's merged (`merged_weights`), else the model's own."""
    if not is_lora(model):
        return model.state_dict()
    return dict(merged_weights(model, unwrap(model).state_dict().items()))
