"""The rollout engine: what a rollout worker generates with and syncs weights into.

A `RolloutEngine` turns prompt token ids into `Samples` under `SamplingParams`, holds the weight
`version` its samples carry, and exposes the tensors the weight sync fills (`named_weights`) and a hook
for when a sync has landed (`update_weights`). `HFDecodeEngine` is the one implemented here: a HF model
decoded by `decode.generate_chunked`. docs/rollout_engines.md says how a vLLM or SGLang engine would map
onto the same methods (not implemented).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from .decode import StaticDecoder, generate_chunked
from .fixed import FixedDecoder
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
    cuda_graphs: bool = True  # the HF engine's fixed-shape, CUDA-graph decode path on CUDA (gen_cuda_graphs)
    check_every: int = 8  # steps between finished-row checks on that path (gen_check_every)

    @classmethod
    def from_config(cls, cfg) -> SamplingParams:
        return cls(max_new_tokens=cfg.gen_max_new_tokens, min_new_tokens=cfg.gen_min_new_tokens,
                   temperature=cfg.gen_temperature, top_p=cfg.gen_top_p, top_k=cfg.gen_top_k,
                   compiled=cfg.gen_compile, batch_size=cfg.gen_batch_size, cuda_graphs=cfg.gen_cuda_graphs,
                   check_every=cfg.gen_check_every)


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
    """A HF causal LM decoded in this process (`decode.generate_chunked`); the sync writes its parameters.

    On CUDA (with `sampling.cuda_graphs`) a supported architecture decodes on the fixed-shape path
    (`fixed.FixedDecoder`: CUDA graphs per batch bucket, no host sync per step); elsewhere, and on a CPU,
    through `decode.generate`, which drops finished rows. `fixed_shape`: force the fixed-shape path on
    (True; on a CPU without graphs, as the tests run it) or off (False); None = on CUDA only.
    """

    def __init__(self, model: torch.nn.Module, version: int = 0, fixed_shape: bool | None = None):
        self.model, self.version, self.fixed_shape = model.eval(), version, fixed_shape
        self._fixed: FixedDecoder | None = None  # made on first use; keeps packed weights and graphs

    def generate(self, prompt_ids: list[list[int]], sampling: SamplingParams, *, pad_id: int, eos_id: int,
                 sample_ids: list[int] | None = None, generator: torch.Generator | None = None) -> Samples:
        s = sampling
        kw = {"eos_id": eos_id, "max_new_tokens": s.max_new_tokens, "min_new_tokens": s.min_new_tokens,
              "temperature": s.temperature, "top_p": s.top_p, "top_k": s.top_k, "compiled": s.compiled,
              "generator": generator, "version": self.version}
        fixed = self._fixed_decoder(s, max(len(p) for p in prompt_ids) + s.max_new_tokens)
        if fixed is not None:
            kw["check_every"] = s.check_every
        return generate_chunked(self.model, prompt_ids, s.batch_size, pad_id=pad_id, sample_ids=sample_ids,
                                fixed=fixed, **kw)

    def _fixed_decoder(self, s: SamplingParams, total_len: int) -> FixedDecoder | None:
        """The fixed-shape decoder when this call takes that path, else None."""
        on = self.fixed_shape
        if on is None:
            on = s.cuda_graphs and next(self.model.parameters()).device.type == "cuda"
        if not on or not StaticDecoder.supports(self.model, total_len):
            return None
        if self._fixed is None:
            self._fixed = FixedDecoder(self.model)
        return self._fixed

    def named_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        return self.model.named_parameters()

    def update_weights(self, version: int) -> None:
        # The receiver already copied into the parameters in place. StaticDecoder packs its weights afresh
        # per `generate`; the fixed-shape decoder keeps packed copies (its graphs read their addresses),
        # which are refreshed here, in place.
        if self._fixed is not None:
            self._fixed.repack()
        self.version = version
