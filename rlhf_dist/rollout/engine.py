"""The rollout engine: what a rollout worker generates with and syncs weights into.

A `RolloutEngine` turns prompt token ids into `Samples` under `SamplingParams`, holds the weight
`version` its samples carry, and exposes the tensors the weight sync fills (`named_weights`) and a hook
for when a sync has landed (`update_weights`). `HFDecodeEngine` is the one implemented here: a HF model
decoded by `decode.generate_chunked`. docs/rollout_engines.md says how a vLLM or SGLang engine would map
onto the same methods (not implemented).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Protocol, runtime_checkable

import torch

from .decode import generate_chunked
from .samples import Samples


@dataclass(frozen=True)
class SamplingParams:
    """How to sample one response per prompt (the config's gen_* fields)."""

    max_new_tokens: int
    min_new_tokens: int = 0  # eos cannot be sampled before this many tokens
    temperature: float = 1.0
    top_p: float = 1.0  # 1 = no nucleus truncation
    top_k: int = 0  # 0 = no top-k truncation
    compiled: bool = False  # the HF engine's torch.compile'd decode step (gen_compile)
    batch_size: int | None = None  # prompts decoded at once (gen_batch_size); None = all

    @classmethod
    def from_config(cls, cfg) -> "SamplingParams":
        return cls(max_new_tokens=cfg.gen_max_new_tokens, min_new_tokens=cfg.gen_min_new_tokens,
                   temperature=cfg.gen_temperature, top_p=cfg.gen_top_p, top_k=cfg.gen_top_k,
                   compiled=cfg.gen_compile, batch_size=cfg.gen_batch_size)


@runtime_checkable
class RolloutEngine(Protocol):
    version: int  # the weight version of the engine's weights, carried by its Samples

    def generate(self, prompt_ids: list[list[int]], sampling: SamplingParams, *, pad_id: int, eos_id: int,
                 sample_ids: list[int] | None = None, generator: torch.Generator | None = None) -> Samples:
        """One response per prompt; rows in prompt order, prompts left-padded, responses right-padded."""
        ...

    def named_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """The tensors a `weight_sync.WeightReceiver` copies the learner's buckets into, in place."""
        ...

    def update_weights(self, version: int) -> None:
        """Every bucket of a sync has landed: generate with them from now on, as `version`."""
        ...


class HFDecodeEngine:
    """A HF causal LM decoded in this process (`decode.generate_chunked`); the sync writes its parameters."""

    def __init__(self, model: torch.nn.Module, version: int = 0):
        self.model, self.version = model.eval(), version

    def generate(self, prompt_ids: list[list[int]], sampling: SamplingParams, *, pad_id: int, eos_id: int,
                 sample_ids: list[int] | None = None, generator: torch.Generator | None = None) -> Samples:
        s = sampling
        return generate_chunked(self.model, prompt_ids, s.batch_size, pad_id=pad_id, eos_id=eos_id,
                                max_new_tokens=s.max_new_tokens, min_new_tokens=s.min_new_tokens,
                                temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, compiled=s.compiled,
                                generator=generator, sample_ids=sample_ids, version=self.version)

    def named_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        return self.model.named_parameters()

    def update_weights(self, version: int) -> None:
        # The receiver already copied into the parameters in place; nothing is cached across calls
        # (StaticDecoder packs its weights afresh per `generate`), so only the version changes.
        self.version = version
