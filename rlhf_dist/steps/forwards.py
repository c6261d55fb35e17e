"""The forwards of one model in one process: response logits, log-probs (and entropy) and values of
sampled sequences, padded or packed. The rollout, reference, learner and eval roles all read them; no Ray,
no DeepSpeed."""

from __future__ import annotations

import torch

from ..algo import chunked_logprobs, entropy_from_logits, logprobs_from_logits
from ..config.stages import ONLINE, micro_batch_size
from ..models.load import token_scalars
from ..models.packing import Packed, forward, one_row, pack, padded, plan_micro_batches


def response_logits(model, sequences: torch.Tensor, attention_mask: torch.Tensor, prompt_len: int,
                    temperature: float = 1.0, packed: Packed | None = None) -> torch.Tensor:
    """Logits that predict the response tokens: (B, P+R) -> (B, R, V). Only response positions are
    projected to the vocabulary (`logits_to_keep`), the rest of the sequence is context; packed, every
    position is (the response positions are spread over the rows)."""
    R = sequences.shape[1] - prompt_len
    if packed is None:
        out = forward(model, sequences, attention_mask, None, logits_to_keep=R + 1)
        logits = out.logits[:, :-1].float()  # (B, R, V)
    else:
        out = forward(model, sequences, attention_mask, packed).logits  # (rows, T, V): every packed position
        logits = padded(out, packed, slice(prompt_len - 1, -1)).float()  # (B, R, V)
    return logits if temperature == 1.0 else logits / temperature  # skip a pass over (B, R, V) when it is a no-op


# Config fields of architectures whose logits are not just lm_head(hidden): they take the full-logits path.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def plain_lm_head(model) -> torch.nn.Linear | None:
    """The output projection when logits = lm_head(decoder(...).last_hidden_state), so chunks of positions can
    be projected by hand; None otherwise: a wrapped (LoRA) lm_head, hooks on it (projecting by hand would skip
    them), a logit transform in the config, or ZeRO-3 partitioned weights (gathered only by its forward hooks)."""
    head = model.get_output_embeddings()
    if type(head) is not torch.nn.Linear or head._forward_hooks or head._forward_pre_hooks:
        return None
    if hasattr(head.weight, "ds_id"):
        return None
    if any(getattr(model.config, k, None) not in (None, 1.0) for k in _LOGIT_TRANSFORMS):
        return None
    return head


def response_hidden(model, sequences: torch.Tensor, attention_mask: torch.Tensor, prompt_len: int,
                    packed: Packed | None = None) -> torch.Tensor:
    """(B, P+R) -> (B, R, H): the decoder's last hidden states at the positions that predict the response
    tokens. `get_decoder` reaches through PEFT wrappers, whose LoRA layers sit inside the decoder."""
    out = forward(model.get_decoder(), sequences, attention_mask, packed)
    return padded(out.last_hidden_state, packed, slice(prompt_len - 1, -1))  # (B, R, H)


def response_logprobs_entropy(model, sequences, attention_mask, prompt_len: int, temperature: float = 1.0,
                              entropy_rows: int | None = 0, chunk: int = 1024, packed: Packed | None = None):
    """(B, P+R) -> logprobs (B, R) of the response tokens and entropies (b, R) of the policy there.
    `entropy_rows`: None = every row, differentiable with the logprobs; k = only the first k rows, without
    gradient (a sample, for logging; no entropy and None returned for k = 0). The logits are projected
    `chunk` positions at a time (`chunked_logprobs`), so no (B, R, V) float32 tensor exists, except for
    models `plain_lm_head` rejects, which take the full-logits path. `packed`: the forward runs over the
    packed layout of the batch (`packing.pack`)."""
    targets = sequences[:, prompt_len:]  # (B, R)
    B, R = targets.shape
    head = plain_lm_head(model)
    if head is None:
        logits = response_logits(model, sequences, attention_mask, prompt_len, temperature, packed)  # (B, R, V)
        logp = logprobs_from_logits(logits, targets)  # (B, R)
        if entropy_rows == 0:
            return logp, None
        with torch.set_grad_enabled(torch.is_grad_enabled() and entropy_rows is None):
            return logp, entropy_from_logits(logits[:entropy_rows])  # (b, R)
    hidden = response_hidden(model, sequences, attention_mask, prompt_len, packed)  # (B, R, H)
    H = hidden.shape[-1]
    logp, entropy = chunked_logprobs(hidden.reshape(-1, H), head.weight, targets.reshape(-1), chunk, temperature,
                                     with_entropy=entropy_rows is None, bias=head.bias)  # (B*R,) each
    if entropy_rows == 0:
        return logp.view(B, R), None
    if entropy_rows is not None:
        with torch.no_grad():  # one more projection, of k rows only
            _, entropy = chunked_logprobs(hidden[:entropy_rows].reshape(-1, H), head.weight,
                                          targets[:entropy_rows].reshape(-1), chunk, temperature, True, head.bias)
    return logp.view(B, R), entropy.view(-1, R)


def response_logprobs(model, sequences, attention_mask, prompt_len: int, temperature: float = 1.0,
                      packed: Packed | None = None) -> torch.Tensor:
    """(B, P+R) -> (B, R) logprob of each response token."""
    return response_logprobs_entropy(model, sequences, attention_mask, prompt_len, temperature, packed=packed)[0]


def response_values(critic, sequences, attention_mask, prompt_len: int, packed: Packed | None = None) -> torch.Tensor:
    """(B, P+R) -> (B, R): V(s_t) for the state before each response token."""
    values = token_scalars(critic, sequences, attention_mask, packed)  # (B, P+R)
    return values[:, prompt_len - 1: -1]


# ---------------------------------------------------------------------------------------
# The no-gradient forwards of a whole batch, in chunks
# ---------------------------------------------------------------------------------------

def forward_micro_batch(cfg) -> int:
    """Samples per no-gradient forward pass (`ppo_forward_micro_batch_size`, default the learners' micro-batch)."""
    return cfg.ppo_forward_micro_batch_size or micro_batch_size(cfg, ONLINE, cfg.roles.policy.num_workers)


def in_chunks(fn, size: int, *rows: torch.Tensor) -> torch.Tensor:
    """fn over chunks of `size` rows of `rows` (each (B, ...)), outputs concatenated on CPU: (B, ...).
    Activation memory is then that of `size` rows, whatever the batch."""
    return torch.cat([fn(*(r[i:i + size] for r in rows)).cpu() for i in range(0, rows[0].shape[0], size)])


def forward_chunks(fn, cfg, seq: torch.Tensor, attn: torch.Tensor, agree=lambda k: k) -> torch.Tensor:
    """fn(seq, attn, packed) over the no-gradient forward's chunks of a padded batch (B, L), outputs on
    CPU in row order: (B, ...). Chunks of `forward_micro_batch` rows (packed None), or with
    ppo_max_tokens_per_micro_batch, chunks of at most that many real tokens, each packed (`packing.pack`;
    `agree`: the chunk count over a learner's ranks, whose ZeRO-3 forwards are collectives)."""
    budget = cfg.ppo_max_tokens_per_micro_batch
    if budget is None:
        return in_chunks(lambda s, a: fn(s, a, None), forward_micro_batch(cfg), seq, attn)
    flat = one_row(cfg.attn_implementation)
    out: list = [None] * seq.shape[0]
    for ids in plan_micro_batches(attn.sum(1).tolist(), budget, agree):
        s, a = seq[ids], attn[ids]
        for i, y in zip(ids, fn(s, a, pack(s, a, flat)).cpu()):
            out[i] = y
    return torch.stack(out)
