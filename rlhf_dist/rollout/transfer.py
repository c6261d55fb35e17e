"""How a weight bucket travels and lands: flat buckets split by name, and CUDA IPC handles.

A bucket is one flat, dtype-uniform tensor (N,) of consecutive parameters with their (name, shape)
entries; every engine's `load_bucket` takes that shape. This module is below both the engines (which
load buckets, in this process or in vLLM's worker) and the weight sync (which moves them).
"""

from __future__ import annotations

import inspect
import math

import torch


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


def export_ipc(flat: torch.Tensor):
    """A picklable handle to a CUDA tensor that another process on the same GPU can open."""
    from torch.multiprocessing.reductions import reduce_tensor

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
