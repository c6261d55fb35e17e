"""How a weight bucket travels and lands: flat buckets split by name, and CUDA IPC handles.

A bucket is one flat, dtype-uniform tensor (N,) of consecutive parameters with their (name, shape)
entries; every engine's `load_bucket` takes that shape. This module is below both the engines (which
load buckets, in this process or in vLLM's worker) and the weight sync (which moves them).
"""

from __future__ import annotations

import inspect
import math

import torch
from torch.multiprocessing.reductions import reduce_tensor


def split_bucket(flat: torch.Tensor, entries: list[tuple[str, tuple]]) -> list[tuple[str, torch.Tensor]]:
    """A flat bucket (N,) as (name, view) pairs in `entries`' order and shapes (no copy)."""
    out, offset = [], 0
    for name, shape in entries:
        n = math.prod(shape)
        out.append((name, flat[offset: offset + n].view(shape)))
        offset += n
    if offset != flat.numel():
        raise RuntimeError(f"weight sync: a bucket of {flat.numel()} elements for parameters of {offset}")
    return out


BLOCK = 1024  # words per row of a bucket's fingerprint


def fingerprint(flat: torch.Tensor) -> tuple[int, int, int]:
    """An exact checksum of a bucket's bytes, the same on any device and in any summation order.

    The bucket's 32-bit words, laid out in rows of BLOCK, are summed per row and per column in int32
    arithmetic that wraps (one fast pass each: int64 accumulation was 13x slower here); the result is the
    words' total and the row and column sums weighted by their index. A flipped bit changes the total, two
    swapped words a row or column term."""
    i64 = torch.int64
    b = flat.detach().contiguous().view(-1).view(torch.uint8)  # (bytes,)
    words = b[: b.numel() // 4 * 4].view(torch.int32)  # (n,)
    k = words.numel() // BLOCK * BLOCK
    body = words[:k].view(-1, BLOCK)  # (rows, BLOCK)
    rest = torch.cat([words[k:].to(i64), b[words.numel() * 4:].to(i64)])  # (< BLOCK + 4,) the tail
    rows, cols = body.sum(1, dtype=torch.int32).to(i64), body.sum(0, dtype=torch.int32).to(i64)  # (rows,), (BLOCK,)

    def weighted(x: torch.Tensor) -> torch.Tensor:
        return (x * torch.arange(1, x.numel() + 1, device=x.device)).sum()

    s = torch.stack([rows.sum() + rest.sum(), weighted(rows), weighted(cols) + weighted(rest)]).tolist()  # one sync
    return s[0], s[1], s[2]


def export_ipc(flat: torch.Tensor):
    """A picklable handle to a CUDA tensor that another process on the same GPU can open."""
    torch.cuda.current_stream(flat.device).synchronize()  # the receiver reads it on another stream and process
    return reduce_tensor(flat)


def open_ipc(handle, device_index: int | None = None) -> torch.Tensor:
    """Open a handle from `export_ipc` on `device_index` (default this process's current device). The
    handle's device index is the sender's (its CUDA_VISIBLE_DEVICES); on the same physical GPU this
    process's own index for it is the one to use (as OpenRLHF does). Where that index sits among the
    rebuild function's arguments is read from its signature, not assumed."""
    rebuild, args = handle
    args = list(args)
    slot = list(inspect.signature(rebuild).parameters).index("storage_device")
    args[slot] = torch.cuda.current_device() if device_index is None else device_index
    return rebuild(*args)
