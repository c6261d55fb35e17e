"""The KTO step (Ethayarajh et al. 2024, arXiv:2402.01306): the policy learns from single completions labelled
desirable or undesirable, with no pairs and no reward model (single-process, no Ray, no DeepSpeed).

KTO's reference point z0 is the policy's KL to the reference, estimated as the mean log pi/ref of
*mismatched* (prompt, completion) pairs: each row's prompt with another row's completion (`unrelated_rows`).
The paper takes these within each micro-batch; here each row's partner is fixed once, from a seeded shuffle,
so the reference's log-probs of both pairs are computed once before training, as DPO's are (`attach_reference`).
The estimate spans the whole optimizer step: a no-grad pass over the step's mismatched pairs
(`kl_rows`, `kl_sums`) comes first, and every micro-batch's loss reads its mean (batch["step_mean"]), so
micro-batches and gradient accumulation give the full batch's loss.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from ..algo import kto_loss
from ..data.encode import Encoded
from ..models.load import adapters_off
from ..models.packing import micro_batch_indices, pack
from .dpo import sequence_logprobs
from .sft import sft_batch


@dataclass
class KTOItem:
    seq: Encoded  # prompt + completion, the loss mask on the completion
    kl: Encoded  # the same prompt with an unrelated row's completion: a sample for the reference point
    desirable: bool
    ref: float = 0.0  # the reference's summed log-prob of seq's completion
    ref_kl: float = 0.0  # ... and of kl's

    @property
    def tokens(self) -> int:
        """Both sequences' tokens: a micro-batch's KL pass holds as many rows as its loss pass."""
        return len(self.seq.input_ids) + len(self.kl.input_ids)


def unrelated_rows(prompts: list, seed: int, tries: int = 64) -> list[int]:
    """For each row i, a row j != i whose prompt differs (KTO's mismatched pair): in a seeded shuffle, the
    next row with another prompt (cyclic; among the next `tries` rows, else simply the next one)."""
    n = len(prompts)
    order = list(range(n))
    random.Random(seed).shuffle(order)
    partner = [0] * n
    for k, i in enumerate(order):
        ahead = (order[(k + d) % n] for d in range(1, min(n, tries + 1)))
        partner[i] = next((j for j in ahead if prompts[j] != prompts[i]), order[(k + 1) % n])
    return partner


def kto_batch(items: list[KTOItem], pad_id: int) -> dict[str, torch.Tensor]:
    """ids (B, T) of prompt + completion, the reference's log-probs (B,), the labels (B,)."""
    batch = sft_batch([it.seq for it in items], pad_id)  # input_ids, attention_mask, loss_mask (B, T)
    batch["ref_logps"] = torch.tensor([it.ref for it in items], dtype=torch.float32)  # (B,)
    batch["desirable"] = torch.tensor([it.desirable for it in items], dtype=torch.bool)  # (B,)
    return batch


def kl_rows(items: list[KTOItem]) -> list[KTOItem]:
    """The mismatched pairs of `items`, as items of their own (for `kto_batch`)."""
    return [KTOItem(it.kl, it.kl, it.desirable, it.ref_kl, it.ref_kl) for it in items]


def kl_sums(model, batch: dict) -> tuple[torch.Tensor, float]:
    """(sum of log pi/ref over a batch of `kl_rows`, row count), no grad: what z0's estimate sums."""
    with torch.no_grad():
        return (sequence_logprobs(model, batch) - batch["ref_logps"]).sum(), float(batch["ref_logps"].shape[0])


def kto_step_loss(model, batch: dict, norm: float, beta: float, desirable_weight: float,
                  undesirable_weight: float) -> tuple[torch.Tensor, dict]:
    """Sum of per-row KTO losses divided by `norm` (the optimizer step's global row count), against the
    step's KL estimate batch["step_mean"]. Stats are sums, as 0-dim tensors (no host sync) or counts."""
    logps = sequence_logprobs(model, batch)  # (B,)
    losses, st = kto_loss(logps, batch["ref_logps"], batch["desirable"], batch["step_mean"], beta,
                          desirable_weight, undesirable_weight)  # (B,)
    total = losses.sum()
    stats = {"loss_sum": total.detach(), "count": logps.shape[0], "tokens": batch["attention_mask"].sum(),
             **{k: v.sum() for k, v in st.items()}}
    return total / norm, stats


def kto_count(items) -> int:
    return len(items)


@torch.no_grad()
def attach_reference(model, to_dev, items: list[KTOItem], pad_id: int, micro: int, max_tokens: int | None = None,
                     flat: bool = True) -> list[KTOItem]:
    """KTOItems with the reference's log-probs of both sequences, `micro` items per forward, or packed
    forwards of at most `max_tokens` tokens (`flat`: one row, `packing.one_row`). Every worker does all rows,
    in the same order: the same values everywhere, and the same number of forwards on every rank (a ZeRO-3
    forward is a collective). With LoRA the reference is the base model: the adapters are off."""
    ref: dict[int, tuple[float, float]] = {}
    for ids in micro_batch_indices([it.tokens for it in items], micro, max_tokens):
        rows = [items[i] for i in ids]
        batch = kto_batch(rows + kl_rows(rows), pad_id)  # (2b, T): the completions, then the mismatched pairs
        if max_tokens is not None:
            batch["packed"] = pack(batch["input_ids"], batch["attention_mask"], flat)
        with adapters_off(model):
            logps = sequence_logprobs(model, to_dev(batch)).tolist()  # (2b,)
        ref.update({i: (logps[j], logps[len(ids) + j]) for j, i in enumerate(ids)})
    return [KTOItem(it.seq, it.kl, it.desirable, *ref[i]) for i, it in enumerate(items)]
