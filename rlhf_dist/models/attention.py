"""Variable-length attention for packed rows, without the flash-attn package.

`attn_implementation: sdpa` loads models with `VARLEN_SDPA`, registered here with transformers: it is
transformers' own sdpa attention and mask unless a forward passes the sequence boundaries of a packed row
(`cu_seq_lens_q`, `max_length_q`: the keyword arguments transformers' flash-attention path uses, which reach
every attention call, and the recomputed forward of gradient checkpointing too). Then each sequence
attends causally to itself only, with no mask and no compute across sequences: on CUDA in half precision
through torch's flash varlen kernel (`torch.nn.attention.varlen.varlen_attn`); elsewhere the sequences are
gathered into a right-padded batch for one `scaled_dot_product_attention(is_causal=True)`, so only the
attention sees padding, never the projections and MLPs. That batch's layout (`seq_layout`) is built once
per forward, on the host, by `packing.pack`; every layer reuses it. Whether the flash kernel works is checked
once per process, device and dtype, before the first packed forward (`check_flash`). A saved config
names no attention implementation, so checkpoints load anywhere.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
import logging

import torch

log = logging.getLogger(__name__)

VARLEN_SDPA = "rlhf_dist_varlen_sdpa"

try:  # torch >= 2.9 on CUDA
    from torch.nn.attention.varlen import varlen_attn
except ImportError:  # pragma: no cover - older torch: the per-sequence loop
    varlen_attn = None


def varlen_sdpa(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask,
                dropout: float = 0.0, scaling: float | None = None, **kwargs):
    """transformers' attention-function signature: query (B, Hq, T, D), key and value (B, Hkv, T, D) ->
    (output (B, T, Hq, D), None)."""
    from transformers.integrations.sdpa_attention import (
        sdpa_attention_forward,  # deferred: loading transformers takes seconds
    )

    cu = kwargs.get("cu_seq_lens_q")  # (n + 1,) int32: sequence starts in the one packed row, then its end
    if cu is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if query.shape[0] != 1 or dropout:
        raise ValueError("packed attention takes one row and no attention dropout")
    if _flash_varlen(query):
        return _flash(query, key, value, cu, int(kwargs["max_length_q"]), scaling), None  # (1, T, Hq, D)
    layout = kwargs.get("seq_layout")  # gather (n, L), scatter (T,): built once per forward by `packing.pack`
    if layout is None:  # a caller that passes the boundaries only: one host read, two copies
        layout = tuple(t.to(query.device) for t in seq_layout(cu.tolist()))
    return _gathered(query, key, value, *layout, scaling), None  # (1, T, Hq, D)


def _gathered(query, key, value, gather: torch.Tensor, scatter: torch.Tensor, scaling: float | None) -> torch.Tensor:
    """One packed row's sequences gathered into a right-padded batch (`seq_layout`: gather (n, L), scatter (T,))
    for one causal sdpa: query (1, Hq, T, D), key and value (1, Hkv, T, D) -> (1, T, Hq, D)."""
    gqa = query.shape[1] != key.shape[1]
    n, L = gather.shape
    # index_select, not x[:, gather]: its backward is an index_add, several times cheaper than index_put on the CPU
    q, k, v = (x[0].index_select(1, gather.flatten()).unflatten(1, (n, L)).transpose(0, 1)
               for x in (query, key, value))  # (n, H, L, D)
    # Each sequence from its own start, right-padded to the longest: causal attention then never lets a real
    # query see a pad key (pads come after it), so no mask is needed and sdpa takes its fused causal kernel.
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling, enable_gqa=gqa)
    H, D = out.shape[1], out.shape[3]
    return out.transpose(1, 2).reshape(n * L, H, D).index_select(0, scatter)[None]  # (1, T, Hq, D)


def _flash(query, key, value, cu: torch.Tensor, longest: int, scaling: float | None) -> torch.Tensor:
    """torch's flash varlen kernel over one packed row: query (1, Hq, T, D), key and value (1, Hkv, T, D),
    cu (n + 1,) int32 -> (1, T, Hq, D)."""
    params = _varlen_params()
    gqa = query.shape[1] != key.shape[1]
    if gqa and "enable_gqa" not in params:  # older torch: repeat each key/value head for its query group
        key, value = (x.repeat_interleave(query.shape[1] // x.shape[1], dim=1) for x in (key, value))
    q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))  # (T, H, D)
    # torch 2.9-2.10 take is_causal, later ones window_size (-1, 0) for causal
    causal = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
    extra = {k: v for k, v in (("scale", scaling), ("enable_gqa", gqa)) if k in params and v is not None}
    return varlen_attn(q, k, v, cu, cu, longest, longest, **causal, **extra)[None]  # (1, T, Hq, D)


_FLASH_OK: dict[tuple[torch.device, torch.dtype], bool] = {}  # `check_flash`'s verdicts, for the process's life


def check_flash(device: torch.device, dtype: torch.dtype) -> None:
    """Decide once per process whether packed rows on `device` (a tensor's, with its index) in `dtype` take
    torch's flash varlen kernel. `packing.forward` calls this before a packed forward, never inside one: the
    check runs a backward, which a forward under no_grad (reference, reward, old logprobs, eval) would refuse."""
    key = (device, dtype)
    if key not in _FLASH_OK and _flash_eligible(device, dtype):
        _FLASH_OK[key] = _flash_works(device, dtype)


def _flash_eligible(device: torch.device, dtype: torch.dtype) -> bool:
    """CUDA, half precision, and a torch whose varlen kernel can run causal attention."""
    return device.type == "cuda" and dtype in (torch.float16, torch.bfloat16) and _varlen_params() is not None


def _flash_varlen(query: torch.Tensor) -> bool:
    """Whether this attention call takes the flash kernel: its device and dtype passed `check_flash`. A pair
    never checked (e.g. a dtype changed by autocast) takes the gathered path: slower, never wrong."""
    return _FLASH_OK.get((query.device, query.dtype), False)


def _flash_works(device: torch.device, dtype: torch.dtype) -> bool:
    """One tiny forward and backward through the kernel with grouped-query heads, against the gathered-sdpa
    path. A torch whose kernel is missing, lacks a backward or disagrees loses only speed: the packed rows
    take the other path."""
    try:
        # The caller's no_grad or inference mode must not turn the backward off.
        with torch.inference_mode(False), torch.enable_grad():
            g = torch.Generator(device=device).manual_seed(0)
            q, k, v = (torch.randn(1, h, 12, 64, generator=g, device=device, dtype=dtype, requires_grad=True)
                       for h in (4, 2, 2))  # (1, H, T, D): 2 query heads per key/value head
            cu = torch.tensor([0, 5, 12], dtype=torch.int32, device=device)
            out = _flash(q, k, v, cu, 7, None)  # (1, 12, 4, 64)
            out.float().sum().backward()
        gather, scatter = (t.to(device) for t in seq_layout([0, 5, 12]))
        want = _gathered(q.detach(), k.detach(), v.detach(), gather, scatter, None)
        torch.testing.assert_close(out.detach().float(), want.float(), atol=2e-2, rtol=2e-2)
        return True
    except Exception as e:  # noqa: BLE001 - any failure means: do not use it
        log.warning("packed attention: torch's flash varlen kernel failed its check on %s %s (%s: %s); "
                    "packed rows use sdpa over the gathered sequences instead", device, dtype, type(e).__name__, e)
        return False


@functools.lru_cache(maxsize=1)
def _varlen_params() -> frozenset[str] | None:
    """The keyword arguments torch's varlen_attn takes (they changed between releases), or None without
    one that can run causal attention."""
    if varlen_attn is None:
        return None
    params = frozenset(inspect.signature(varlen_attn).parameters)
    return params if {"window_size", "is_causal"} & params else None


def seq_layout(bounds: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequence starts `bounds` (then the end) of one row of T tokens -> host tensors (gather (n, L): row
    positions of each sequence right-padded to the longest L, pads pointing at whatever follows; scatter (T,):
    each row position's place in the flattened (n, L)). Built on the host, so no device read or copy per layer."""
    starts = torch.tensor(bounds[:-1])  # (n,)
    lengths = torch.tensor(bounds[1:]) - starts  # (n,)
    L, T = int(lengths.max()), bounds[-1]
    gather = (starts[:, None] + torch.arange(L)).clamp_(max=T - 1)  # (n, L)
    seq = torch.repeat_interleave(torch.arange(len(starts)), lengths)  # (T,) sequence of each position
    scatter = seq * L + torch.arange(T) - starts[seq]  # (T,)
    return gather, scatter


_UNMASKED = contextvars.ContextVar("rlhf_dist_unmasked", default=False)


@contextlib.contextmanager
def unmasked():
    """Within: forwards build no attention mask (`packing.forward` of one packed row, whose attention takes
    the sequence boundaries instead). Outside, the mask is sdpa's, right for any layout, so a forward that
    forgets this context is slower, never wrong. Recomputation under gradient checkpointing reuses the mask
    its forward was given."""
    token = _UNMASKED.set(True)
    try:
        yield
    finally:
        _UNMASKED.reset(token)


def _mask(*args, **kwargs):
    from transformers.masking_utils import sdpa_mask  # deferred: loading transformers takes seconds

    return None if _UNMASKED.get() else sdpa_mask(*args, **kwargs)


def register() -> str:
    """Register `VARLEN_SDPA` with transformers (idempotent); returns its name."""
    from transformers import AttentionInterface  # deferred: loading transformers takes seconds
    from transformers.masking_utils import AttentionMaskInterface  # deferred: loading transformers takes seconds

    AttentionInterface.register(VARLEN_SDPA, varlen_sdpa)
    AttentionMaskInterface.register(VARLEN_SDPA, _mask)
    return VARLEN_SDPA
