"""The rollout engine: what a rollout worker generates with and loads weights into.

A `RolloutEngine` turns prompt token ids into `Samples` under `SamplingParams`, holds the weight
`version` its samples carry, and takes a weight sync bucket by bucket (`load_bucket`), then
`update_weights` once every bucket has landed. Two engines implement it: `HFDecodeEngine` (a HF model
decoded in this process, `decode.generate_chunked`) and `vllm_engine.VLLMEngine` (vLLM, the GPU
default). `engines.choose_engine` says which one a rollout worker runs, and why; docs/rollout_engines.md
has the whole contract.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from ..models.load import load_causal_lm
from .decode import generate_chunked
from .samples import Samples
from .transfer import fingerprint, split_bucket


@dataclass(frozen=True)
class SamplingParams:
    """How to sample one response per prompt (the config's gen_* fields)."""

    max_new_tokens: int
    min_new_tokens: int = 0  # eos cannot be sampled before this many tokens
    temperature: float = 1.0
    top_p: float = 1.0  # 1 = no nucleus truncation
    top_k: int = 0  # 0 = no top-k truncation
    compiled: bool = False  # the HF engine's torch.compile'd decode step (gen_compile)
    batch_size: int | None = None  # prompts the HF engine decodes at once (gen_batch_size); None = all

    @classmethod
    def from_config(cls, cfg) -> SamplingParams:
        return cls(max_new_tokens=cfg.gen_max_new_tokens, min_new_tokens=cfg.gen_min_new_tokens,
                   temperature=cfg.gen_temperature, top_p=cfg.gen_top_p, top_k=cfg.gen_top_k,
                   compiled=cfg.gen_compile, batch_size=cfg.gen_batch_size)


@runtime_checkable
class RolloutEngine(Protocol):
    version: int  # the weight version of the engine's weights, carried by its Samples

    def generate(self, prompt_ids: list[list[int]], sampling: SamplingParams, *, pad_id: int, eos_id: int,
                 sample_ids: list[int] | None = None, generator: torch.Generator | None = None) -> Samples:
        """One response per prompt; rows in prompt order, prompts left-padded, responses right-padded. The
        logprobs are the sampled tokens' under the untruncated softmax(logits / temperature)."""
        ...

    def check_signature(self, signature: list, who: str) -> None:
        """Raise if the learner's (name, shape, dtype) list cannot be loaded into this engine."""
        ...

    def load_bucket(self, flat: torch.Tensor, entries: list[tuple[str, tuple]]) -> tuple[int, int, int]:
        """One bucket of a sync: flat (N,) holds the parameters `entries` names, in order and shape. Returns
        the `transfer.fingerprint` of the bucket as the engine received it, for the sync's check."""
        ...

    def update_weights(self, version: int) -> None:
        """Every bucket of a sync has landed: generate with them from now on, as `version`."""
        ...


class HFDecodeEngine:
    """A HF causal LM decoded in this process (`decode.generate_chunked`); a sync copies into its
    parameters in place, by name."""

    def __init__(self, model: torch.nn.Module, version: int = 0):
        self.model, self.version = model.eval(), version
        self.params = dict(model.named_parameters())

    def generate(self, prompt_ids: list[list[int]], sampling: SamplingParams, *, pad_id: int, eos_id: int,
                 sample_ids: list[int] | None = None, generator: torch.Generator | None = None) -> Samples:
        s = sampling
        return generate_chunked(self.model, prompt_ids, s.batch_size, pad_id=pad_id, sample_ids=sample_ids,
                                eos_id=eos_id, max_new_tokens=s.max_new_tokens, min_new_tokens=s.min_new_tokens,
                                temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, compiled=s.compiled,
                                generator=generator, version=self.version)

    def check_signature(self, signature: list, who: str) -> None:
        mine = [(n, tuple(p.shape)) for n, p in self.params.items()]
        if mine != [(n, tuple(s)) for n, s, _ in signature]:
            raise RuntimeError(f"{who}: parameters differ from the learner's (names or shapes); cannot sync weights")

    @torch.no_grad()
    def load_bucket(self, flat: torch.Tensor, entries: list[tuple[str, tuple]]) -> tuple[int, int, int]:
        params = [self.params[name] for name, _ in entries]
        for p, (_, t) in zip(params, split_bucket(flat, entries)):
            p.copy_(t)  # casts to the engine's dtype and device
        # Read back what the parameters now hold, in the sender's dtype; a narrower dtype here than the
        # sender's cannot give its bytes back, so only the bucket as received is checked then.
        if all(p.dtype == flat.dtype or p.dtype == torch.float32 for p in params):
            return fingerprint(flatten_as(params, flat.dtype))
        return fingerprint(flat)

    def update_weights(self, version: int) -> None:
        self.version = version  # the buckets were copied in place; nothing is derived from them


def flatten_as(params: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """The parameters in one flat tensor of `dtype`: (sum of numels,)."""
    return torch.cat([p.detach().reshape(-1).to(dtype) for p in params])


def build(cfg, model_dir: str, device: torch.device, bf16: bool, gpu_share: float, on_death=None) -> HFDecodeEngine:
    """The engine table's builder (`config/engines.py`): the policy loaded in this process."""
    return HFDecodeEngine(load_causal_lm(model_dir, bf16, cfg.attn_implementation).to(device))
