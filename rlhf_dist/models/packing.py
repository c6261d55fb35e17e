"""Packing: the real tokens of a micro-batch laid end to end in rows, so no compute goes to padding.

A packed micro-batch keeps every sequence's own position ids (restarting at 0), and attention never
crosses a sequence. With sdpa (`attention.VARLEN_SDPA`) and flash_attention_2, all tokens go in one row
and the forward gets the sequence boundaries (`cu_seq_lens_q`): each sequence attends to itself alone,
with no mask and no padding. eager gets rows no longer than the micro-batch's longest sequence and a
block-diagonal causal mask that transformers builds from the position ids (`find_packed_sequence_indices`).

`Packed.unpack` puts packed outputs back at the padded batch's positions, so losses and their token
weights are computed exactly as without packing; only the float summation order differs.

Micro-batches are planned by tokens (`plan_micro_batches`): first-fit decreasing into bins of at most
`*_max_tokens_per_micro_batch` real tokens, then split until every data-parallel rank has the same count
(ZeRO-2 reduces and ZeRO-3 gathers inside each backward and forward: collectives every rank must join).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import torch

from .attention import check_flash, seq_layout, unmasked

log = logging.getLogger(__name__)


def first_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices into `lengths` grouped into bins of at most `capacity` (a longer item gets a bin alone).
    Longest first, each into the first bin it fits; bins keep their items in index order."""
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for b, r in enumerate(room):
            if lengths[i] <= r:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(capacity - lengths[i])
    return [sorted(b) for b in bins]


def split_to(bins: list[list[int]], lengths: list[int], count: int) -> list[list[int]]:
    """Split the bin of most tokens (of those with 2+ items) in two, as evenly by tokens as its order allows, until there are
    `count` bins. `count` must not exceed the number of items."""
    bins = [list(b) for b in bins]
    if count > sum(len(b) for b in bins):
        raise ValueError(f"cannot make {count} micro-batches of {sum(len(b) for b in bins)} items")
    while len(bins) < count:
        j = max((k for k, b in enumerate(bins) if len(b) > 1), key=lambda k: sum(lengths[i] for i in bins[k]))
        b = bins.pop(j)
        prefix = [sum(lengths[i] for i in b[:c]) for c in range(1, len(b))]  # tokens before each cut
        total = prefix[-1] + lengths[b[-1]]
        cut = 1 + min(range(len(prefix)), key=lambda c: abs(2 * prefix[c] - total))
        bins[j:j] = [b[:cut], b[cut:]]
    return bins


def plan_micro_batches(lengths: list[int], max_tokens: int,
                       agree: Callable[[int], int] = lambda k: k) -> list[list[int]]:
    """This rank's items (their token `lengths`) -> micro-batches of item indices, at most `max_tokens`
    real tokens each unless one item alone is longer. `agree(k)`: the largest count over the data-parallel
    ranks (a collective; identity in one process), which every rank then splits its bins to reach."""
    bins = first_fit_decreasing(lengths, max_tokens)
    over = [lengths[b[0]] for b in bins if len(b) == 1 and lengths[b[0]] > max_tokens]
    if over:
        log.warning("packing: %d item(s) of up to %d tokens exceed the micro-batch budget of %d tokens and go "
                    "alone", len(over), max(over), max_tokens)
    return split_to(bins, lengths, agree(len(bins)))


def micro_batch_indices(lengths: list[int], size: int, max_tokens: int | None = None,
                        agree: Callable[[int], int] = lambda k: k) -> list[list[int]]:
    """Micro-batches (item indices) of items of these token `lengths`: `size` items each, in order, or with
    `max_tokens`, planned by tokens (`plan_micro_batches`, `agree` as there)."""
    if max_tokens is None:
        return [list(range(i, min(i + size, len(lengths)))) for i in range(0, len(lengths), size)]
    return plan_micro_batches(lengths, max_tokens, agree)


@dataclass
class Packed:
    """Where the real tokens of a padded (B, L) batch sit in the packed (rows, T) layout."""

    input_ids: torch.Tensor  # (rows, T)
    position_ids: torch.Tensor  # (rows, T): each sequence from 0; the tail of a short row from 0 too
    index: torch.Tensor  # (B, L) long: flat index (row * T + column) of each padded position; rows*T = padding
    bounds: list[int] | None = None  # one row: where each sequence starts, then the row's end (host ints)
    cu_seqlens: torch.Tensor | None = None  # (n + 1,) int32: `bounds` on the forward's device
    layout: tuple[torch.Tensor, torch.Tensor] | None = None  # one row: `attention.seq_layout`, (n, L) and (T,)

    def to(self, device) -> "Packed":
        cu = None if self.cu_seqlens is None else self.cu_seqlens.to(device)
        layout = None if self.layout is None else tuple(t.to(device) for t in self.layout)
        return Packed(self.input_ids.to(device), self.position_ids.to(device), self.index.to(device), self.bounds, cu,
                      layout)

    def unpack(self, x: torch.Tensor, columns: slice = slice(None)) -> torch.Tensor:
        """(rows, T, ...) -> (B, L, ...): packed values back at the padded positions, zeros on padding;
        `columns`: only those of the padded layout (e.g. a response's), so no more is copied."""
        index = self.index[:, columns]  # (B, L')
        flat = x.reshape(-1, *x.shape[2:])  # (rows*T, ...)
        flat = torch.cat([flat, flat.new_zeros((1, *flat.shape[1:]))])  # (rows*T + 1, ...)
        # index_select: its backward is an index_add, several times cheaper than flat[index]'s on the CPU
        return flat.index_select(0, index.flatten()).unflatten(0, index.shape)  # (B, L', ...)

    @property
    def tokens(self) -> int:
        return int((self.index < self.input_ids.numel()).sum())


def pack(input_ids: torch.Tensor, attention_mask: torch.Tensor, one_row: bool = True) -> Packed:
    """A padded batch (B, L), any padding side -> its real tokens packed (on the CPU, before the batch moves
    to its device: planning needs the lengths on the host). `one_row`: all tokens in one row, with their
    sequence boundaries (varlen attention: sdpa, flash_attention_2); else first-fit rows of the longest
    sequence's length, for a block mask (eager)."""
    mask = attention_mask.bool().cpu()  # (B, L)
    lengths = mask.sum(1).tolist()
    # Rows of the longest length: wider rows leave less padding, but sdpa's masked attention costs the
    # full row length squared (rows of 2x and 4x were 1.1x and 1.4x slower in scripts/bench_learner.py).
    rows = [list(range(len(lengths)))] if one_row else first_fit_decreasing(lengths, max(lengths))
    T = max(sum(lengths[i] for i in r) for r in rows)
    ids = input_ids.new_zeros((len(rows), T))  # (rows, T)
    pos = torch.arange(T).repeat(len(rows), 1)  # (rows, T): a short row's tail counts from its own 0
    index = torch.full(mask.shape, len(rows) * T, dtype=torch.long)  # (B, L)
    src = input_ids.cpu()
    for r, members in enumerate(rows):
        col = 0
        for b in members:
            n = lengths[b]
            ids[r, col:col + n] = src[b][mask[b]]
            pos[r, col:col + n] = torch.arange(n)
            index[b, mask[b]] = r * T + col + torch.arange(n)
            col += n
        pos[r, col:] = torch.arange(T - col)
    if not one_row:
        return Packed(ids, pos, index)
    bounds = [0]
    for b in rows[0]:
        bounds.append(bounds[-1] + lengths[b])
    return Packed(ids, pos, index, bounds, torch.tensor(bounds, dtype=torch.int32), seq_layout(bounds))


def one_row(attn_implementation: str) -> bool:
    """Whether packed tokens go in one row with their boundaries (varlen attention), not rows under a mask."""
    return attn_implementation != "eager"


def forward(module, input_ids: torch.Tensor, attention_mask: torch.Tensor, packed: Packed | None, **kw):
    """`module` (a HF model, or its decoder) over a padded batch, or over its packed layout. One packed row
    runs with no mask built (`attention.unmasked`): its attention takes the boundaries instead."""
    inputs = model_inputs(input_ids, attention_mask, packed)
    if packed is None or packed.bounds is None:
        return module(**inputs, **kw)
    # Before the forward, not inside it: the flash kernel's one-off check runs a backward.
    check_flash(packed.input_ids.device, next(module.parameters()).dtype)
    with unmasked():
        return module(**inputs, **kw)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding, the same in generation and in scoring: (B, T) -> (B, T)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def model_inputs(input_ids: torch.Tensor, attention_mask: torch.Tensor, packed: Packed | None) -> dict:
    """Keyword arguments of a HF forward over a padded batch, or over its packed layout."""
    if packed is None:
        return {"input_ids": input_ids, "attention_mask": attention_mask,
                "position_ids": position_ids_from_mask(attention_mask), "use_cache": False}
    kw = {"input_ids": packed.input_ids, "attention_mask": None, "position_ids": packed.position_ids,
          "use_cache": False}
    if packed.bounds is not None:  # the names transformers' flash-attention path reads; `seq_layout` is ours
        longest = max(b - a for a, b in zip(packed.bounds[:-1], packed.bounds[1:]))
        kw.update(cu_seq_lens_q=packed.cu_seqlens, cu_seq_lens_k=packed.cu_seqlens, max_length_q=longest,
                  max_length_k=longest, seq_layout=packed.layout)
    return kw


def padded(x: torch.Tensor, packed: Packed | None, columns: slice = slice(None)) -> torch.Tensor:
    """A forward's per-position output in the padded layout, only `columns` of it: sliced, or unpacked."""
    return x[:, columns] if packed is None else packed.unpack(x, columns)
