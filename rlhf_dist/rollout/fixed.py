"""The fixed-shape decode path, for GPUs: one CUDA graph per batch bucket, and no host sync per step.

`decode.generate` drops finished rows and calls the step with new shapes, which is right on a CPU (less
work) but on a GPU pays a kernel launch per op (~24 layers x 15 kernels for a small model) and a host
sync per step. Here instead (issue 20):

- rows stay in the batch; a finished row's token is forced to pad and its logprob to 0 (masked, not
  copied out), and `live.any()` is read to the host only every `check_every` steps;
- the batch is padded up to a power of two and the KV cache length to a multiple of decode.CACHE_BUCKET, and
  each (rows, cache length) bucket keeps a `Slot`: static input buffers, a preallocated KV cache, and
  the step captured once as a `torch.cuda.CUDAGraph` that reads them (`graphs=True`);
- the cache slot index `t` is a device tensor advanced in place: no host-to-device copy per step;
- sampling (`decode.sample_token`) runs as a few device kernels outside the graph, with no host sync;
- the prefill is the model's own forward (its `attn_implementation`: sdpa by default, or flash).

With `graphs=False` (the CPU tests) the same slots, buffers and step function run eagerly, the output
copied into one fixed tensor as a replay would leave it.
"""

from __future__ import annotations

import logging
from collections import OrderedDict

import torch

from ..models import position_ids_from_mask
from .decode import (
    PackedWeights,
    cache_bucket,
    compiled_decode_step,
    decode_step,
    left_pad,
    rotary_tables,
    sample_token,
    to_samples,
)
from .samples import Samples

log = logging.getLogger(__name__)

def row_bucket(n: int) -> int:
    """The batch size a batch of n rows is padded to: the next power of two (>= n)."""
    return 1 << max(n - 1, 0).bit_length()


def capture(fn, graphs: bool):
    """fn() -> a tensor, reading only buffers that outlive it. -> (replay, out): `replay()` recomputes
    `out` in place from the buffers' current contents.

    graphs: a CUDA graph, warmed up on a side stream first (lazy initialisations such as cuBLAS
    workspaces or torch.compile must not happen during capture), as the PyTorch CUDA graph docs show.
    Otherwise fn runs eagerly on each replay and its result is copied into `out`, as a replay leaves it.
    """
    if not graphs:
        out = fn()
        return (lambda: out.copy_(fn())), out
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # as the docs' example
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph.replay, out


class Slot:
    """One (rows, cache length) bucket: static inputs tok, pos (rows,) and t (1,), the KV cache, the
    padding bias, and the captured step whose output is `logits` (rows, V)."""

    def __init__(self, dec: FixedDecoder, rows: int, L: int, dtype: torch.dtype, device: torch.device,
                 compiled: bool):
        base = dec.model.model
        hkv, D = dec.heads[1:]
        self.rows, self.L = rows, L
        self.tok = torch.zeros(rows, dtype=torch.long, device=device)  # (rows,)
        self.pos = torch.zeros(rows, dtype=torch.long, device=device)  # (rows,)
        self.t = torch.zeros(1, dtype=torch.long, device=device)  # (1,) the cache slot the next token fills
        self.k = [torch.zeros((rows, hkv, L, D), dtype=dtype, device=device) for _ in base.layers]  # (rows, kvH, L, D)
        self.v = [torch.zeros_like(k) for k in self.k]
        self.bias = torch.zeros((rows, 1, 1, L), dtype=dtype, device=device)  # (rows, 1, 1, L) -inf on padding
        cos, sin = rotary_tables(base, self.k[0], L)  # (L, D) each
        fn = compiled_decode_step(rows, L) if compiled else decode_step
        weights = dec.packed.weights

        def step() -> torch.Tensor:  # (rows, V)
            return fn(self.tok, self.pos, self.t, L, True, weights, self.k, self.v, cos, sin, self.bias,
                      dec.heads, dec.scale, dec.eps)

        self.replay, self.logits = capture(step, dec.graphs)

    def load(self, cache, attn: torch.Tensor) -> None:
        """The prefill's cache (n <= rows rows, P slots) and mask attn (n, P) into this slot; other rows
        and slots are zeroed (a stale NaN times a zero attention weight would still be NaN)."""
        n, P = attn.shape
        for k, v, layer in zip(self.k, self.v, cache.layers):
            k.zero_()
            v.zero_()
            k[:n, :, :P], v[:n, :, :P] = layer.keys, layer.values
        self.bias.zero_()
        self.bias[:n, 0, 0, :P].masked_fill_(attn == 0, float("-inf"))
        self.t.fill_(P)

    def step(self, tok: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """tok, pos (rows,) -> next-token logits (rows, V): the static output, valid until the next step."""
        self.tok.copy_(tok)
        self.pos.copy_(pos)
        self.replay()
        self.t.add_(1)  # in place on the device: no host-to-device copy per step
        return self.logits


class FixedDecoder:
    """Decodes a model on the fixed-shape path, keeping its packed weights and up to `max_slots` slots
    (each a KV cache and a graph) across calls; call `repack()` after a weight sync.

    graphs: capture each slot's step as a CUDA graph (None: when the model is on CUDA).
    check_every: steps between reads of `live.any()` to the host (the only sync in the loop).
    """

    def __init__(self, model, graphs: bool | None = None, check_every: int = 8, max_slots: int = 4):
        attn0, cfg = model.model.layers[0].self_attn, model.config
        device = next(model.parameters()).device
        self.model, self.check_every, self.max_slots = model, check_every, max_slots
        self.graphs = device.type == "cuda" if graphs is None else graphs
        self.heads = (cfg.num_attention_heads, cfg.num_key_value_heads, attn0.head_dim)
        self.scale, self.eps = attn0.scaling, model.model.norm.variance_epsilon
        self.packed = PackedWeights(model)
        self.slots: OrderedDict[tuple, Slot] = OrderedDict()

    def repack(self) -> None:
        self.packed.repack()

    def slot(self, rows: int, L: int, dtype: torch.dtype, device: torch.device, compiled: bool = False) -> Slot:
        """The slot for this bucket, made (and its step captured) on first use; least recently used ones
        are dropped beyond max_slots (each holds a KV cache)."""
        key = (rows, L, dtype, compiled)
        if key in self.slots:
            self.slots.move_to_end(key)
            return self.slots[key]
        while len(self.slots) >= self.max_slots:
            self.slots.popitem(last=False)
        log.info("fixed-shape decode: %s the step for %d rows and a cache of %d tokens (once per bucket)",
                 "capturing" if self.graphs else "building", rows, L)
        try:
            self.slots[key] = Slot(self, rows, L, dtype, device, compiled)
        except RuntimeError as e:  # a capture this GPU or torch refuses: decode eagerly, as on a CPU
            if not self.graphs:
                raise
            log.warning("fixed-shape decode: CUDA graph capture failed (%s); running the step without graphs", e)
            self.graphs = False
            self.slots[key] = Slot(self, rows, L, dtype, device, compiled)
        return self.slots[key]

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], *, pad_id: int, eos_id: int, max_new_tokens: int,
                 temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, min_new_tokens: int = 0,
                 generator: torch.Generator | None = None, sample_ids: list[int] | None = None,
                 version: int = 0, compiled: bool = False, check_every: int | None = None) -> Samples:
        """As `decode.generate` (same arguments and semantics), on the fixed-shape path. Every row draws
        its uniform each step (padding and finished rows too), so a seeded call draws in another order
        than `decode.generate`, whose finished rows stop drawing; greedy results are the same."""
        from transformers import DynamicCache

        device = next(self.model.parameters()).device
        ids, attn = left_pad(prompts, pad_id)  # (B, P)
        ids, attn = ids.to(device), attn.to(device)
        B, P = ids.shape
        cache = DynamicCache()
        pos = position_ids_from_mask(attn)  # (B, P)
        logits = self.model(input_ids=ids, attention_mask=attn, position_ids=pos, past_key_values=cache,
                            use_cache=True, logits_to_keep=1).logits[:, -1]  # (B, V)
        rows = row_bucket(B)
        slot = self.slot(rows, cache_bucket(P + max_new_tokens), cache.layers[0].keys.dtype, device, compiled)
        slot.load(cache, attn)
        del cache  # the slot holds the prompt's keys and values now
        logits = torch.cat([logits, logits.new_zeros((rows - B, logits.shape[1]))])  # (rows, V) padding rows
        next_pos = torch.nn.functional.pad(pos[:, -1] + 1, (0, rows - B), value=P)  # (rows,)
        live = torch.arange(rows, device=device) < B  # (rows,) padding rows never generate
        sample = {"temperature": temperature, "top_p": top_p, "top_k": top_k, "generator": generator}
        tokens, logps, lengths = self._loop(slot, logits, next_pos, live, max_new_tokens, min_new_tokens,
                                            pad_id, eos_id, sample, check_every or self.check_every)
        return to_samples(ids, attn, tokens[:B], logps[:B], lengths[:B], sample_ids, version)

    def _loop(self, slot: Slot, logits: torch.Tensor, next_pos: torch.Tensor, live: torch.Tensor, R: int,
              min_new: int, pad_id: int, eos_id: int, sample: dict, check_every: int):
        """The decode loop: logits (rows, V) of the prompt's last token, next_pos, live (rows,) ->
        tokens, logps (rows, R) and lengths (rows,). No host sync but `live.any()` every check_every steps."""
        rows = live.shape[0]
        tokens = torch.full((rows, R), pad_id, dtype=torch.long, device=live.device)  # (rows, R)
        logps = torch.zeros((rows, R), dtype=torch.float32, device=live.device)  # (rows, R)
        lengths = torch.zeros(rows, dtype=torch.long, device=live.device)  # (rows,)
        for t in range(R):
            tok, lp = sample_token(logits, ban=eos_id if t < min_new else None, **sample)  # (rows,), (rows,)
            tok = tok.masked_fill(~live, pad_id)  # finished rows are masked, not copied out
            tokens[:, t] = tok
            logps[:, t] = lp.masked_fill(~live, 0.0)
            lengths += live
            live = live & (tok != eos_id)
            if t == R - 1 or ((t + 1) % check_every == 0 and not bool(live.any())):
                break
            logits = slot.step(tok, next_pos)  # (rows, V)
            next_pos += 1
        return tokens, logps, lengths
