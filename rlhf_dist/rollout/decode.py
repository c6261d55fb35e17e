"""The HF decoder: prompts -> responses, with a KV cache, left-padded batches and no work on finished rows."""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from ..models.packing import position_ids_from_mask
from .samples import Samples, merge_samples, select_samples

log = logging.getLogger(__name__)


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """-> ids (B, P), attention mask (B, P)."""
    P = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), P), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), P), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, P - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, P - len(p):] = 1
    return ids, mask


def truncate(logp: torch.Tensor, top_p: float, top_k: int,
             ban: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """logprobs (N, V) -> what top-k, top-p and the `ban` leave: candidates (N, C) (logprobs, -inf where
    cut), and their vocabulary ids (N, C), or None when the candidates are the whole vocabulary in order.

    Top-k takes the k largest with `torch.topk` (no sort of the vocabulary); top-p then works on those k,
    already in decreasing order. Top-p without top-k sorts the vocabulary: an exact nucleus needs the
    order, and the sort-free alternatives (bisection, rejection) either loop on data-dependent conditions
    (a host sync per step) or cost ~30 passes over the vocabulary.
    """
    if ban is not None:
        logp = logp.clone()
        logp[:, ban] = float("-inf")
    if top_k and top_k < logp.shape[-1]:
        cand, idx = torch.topk(logp, top_k, dim=-1)  # (N, k) in decreasing order
    elif top_p < 1.0:
        cand, idx = torch.sort(logp, dim=-1, descending=True)  # (N, V)
    else:
        return logp, None
    if top_p < 1.0:
        # Mass renormalised over what top-k and the ban left, as HF's and vLLM's top-p see it.
        probs = cand.softmax(-1)  # (N, C)
        cand = cand.masked_fill(probs.cumsum(-1) - probs > top_p, float("-inf"))  # smallest prefix reaching top_p
    return cand, idx


def sample_token(logits: torch.Tensor, temperature: float, top_p: float, top_k: int,
                 generator: torch.Generator | None, ban: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (N, V) -> token (N,), logprob (N,) of that token under softmax(logits / temperature).

    The logprob ignores top-k/top-p truncation and the `ban`ned token, as the learner scores with the
    same plain softmax: the rollout's logprobs can stand in for the learner's old logprobs. No host sync:
    every step is a device kernel, so a decode loop on a GPU never waits here.
    """
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)  # (N, V)
    cand, idx = truncate(logp, top_p, top_k, ban)  # (N, C), (N, C) or None
    # Inverse-CDF sampling: one uniform per row. torch.multinomial draws an exponential per vocabulary
    # entry, which took 12% of a decode step here (scripts/bench_ppo.py --decode).
    cdf = cand.exp().cumsum(-1)  # (N, C)
    u = torch.rand((cdf.shape[0], 1), generator=generator, device=cdf.device) * cdf[:, -1:]  # (N, 1)
    pick = torch.searchsorted(cdf, u, right=True).clamp_(max=cdf.shape[1] - 1)  # (N, 1)
    token = (pick if idx is None else idx.gather(1, pick)).squeeze(1)  # (N,)
    return token, logp.gather(1, token[:, None]).squeeze(1)


PACK_MAX_BYTES = 256 * 2**20  # models up to this size decode from packed copies of their weights
CACHE_BUCKET = 64  # fixed-shape caches are rounded up to a multiple of this many tokens


def cache_bucket(n: int) -> int:
    """The KV cache length for n tokens (prompt + new) of a compiled step: a multiple of CACHE_BUCKET,
    so prompts of other lengths mostly reuse one compiled step."""
    return -(-n // CACHE_BUCKET) * CACHE_BUCKET


def rotary_tables(base, like: torch.Tensor, L: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (L, D) of a Llama-family decoder `base` for positions 0..L-1, sin pre-signed for
    `decode_step`: rotate_half(x) * sin == swap_halves(x) * [-sin_1, sin_2], so the sign goes in once."""
    cos, sin = base.rotary_emb(like, torch.arange(L, device=like.device)[None])  # (1, L, D)
    D = cos.shape[-1]
    return cos[0], torch.cat([-sin[0, :, : D // 2], sin[0, :, D // 2:]], dim=-1)


class PackedWeights:
    """`decode_step`'s weight layout: q/k/v and gate/up fused into one matrix each, every matrix transposed
    to (in, out). Models of at most PACK_MAX_BYTES are copied into it (once per `generate` call, so a
    weight sync is always seen); larger ones use their parameters by reference (views): the copy would
    double the rollout's weight memory."""

    def __init__(self, model):
        base = model.model
        self.pack = sum(p.numel() * p.element_size() for p in model.parameters()) <= PACK_MAX_BYTES
        layers = tuple((x.input_layernorm.weight,
                        self._proj(x.self_attn.q_proj, x.self_attn.k_proj, x.self_attn.v_proj),
                        self._proj(x.self_attn.o_proj), x.post_attention_layernorm.weight,
                        self._proj(x.mlp.gate_proj, x.mlp.up_proj), self._proj(x.mlp.down_proj)) for x in base.layers)
        self.weights = (base.embed_tokens.weight, layers, base.norm.weight, self._proj(model.lm_head))

    def _proj(self, *linears) -> tuple:
        """-> (matrices (in, out) whose outputs sit side by side, bias or None)."""
        b = torch.cat([lin.bias for lin in linears]) if linears[0].bias is not None else None  # (out,)
        if not self.pack:
            return tuple(lin.weight.t() for lin in linears), b  # views of the parameters
        return (torch.cat([lin.weight for lin in linears]).t().contiguous(),), b  # (in, out)


class CacheDecoder:
    """One decode step through the model's own forward and a transformers DynamicCache (any architecture)."""

    fixed_shape = False  # finished rows leave the batch

    def __init__(self, model, cache, attn: torch.Tensor):
        self.model, self.cache, self.attn = model, cache, attn  # attn (n, P + t)

    def select(self, idx: torch.Tensor) -> None:
        self.cache.batch_select_indices(idx)
        self.attn = self.attn[idx]

    def step(self, tok: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """tok (n,), pos (n,) -> next-token logits (n, V)."""
        self.attn = torch.cat([self.attn, self.attn.new_ones((tok.shape[0], 1))], dim=1)
        return self.model(input_ids=tok[:, None], attention_mask=self.attn, position_ids=pos[:, None],
                          past_key_values=self.cache, use_cache=True).logits[:, -1]


class StaticDecoder:
    """A tight decode step for Llama-family models on a preallocated (static) KV cache.

    The prompt goes through the regular forward (prefill), whose cache is copied in once. Each step then
    skips what the generic forward redoes: module dispatch, building a 4D mask, recomputing the rotary
    table, concatenating the cache. The step itself is `decode_step`, a pure function of tensors.

    The weights are laid out as a step wants (`PackedWeights`) once per `generate` call (a weight sync never
    lands inside a call). On the benchmark model the packed copy made decoding 0.98-1.13x as fast, about
    1.09x typically (docs/benchmarks.md).

    `compiled`: the step runs through `torch.compile`, which fuses the elementwise work around the matmuls
    (norms, rotary, attention, SiLU). Shapes must then stay fixed: finished rows stay in the batch
    (`fixed_shape`), attention spans the whole cache with the slots after the current one masked, and the
    cache length is rounded up to a multiple of CACHE_BUCKET, so prompts of other lengths mostly reuse the
    compiled step. Each new batch size or bucket compiles once per process.
    """

    ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")

    @classmethod
    def supports(cls, model, total_len: int) -> bool:
        """Only plain modules: an adapter (e.g. a LoRA layer in place of nn.Linear) or a forward hook
        changes what a module computes, which the functional step would bypass."""
        cfg = model.config
        window = getattr(cfg, "sliding_window", None)
        if type(model).__name__ not in cls.ARCHITECTURES or model.training:
            return False
        if window and getattr(cfg, "use_sliding_window", True) and total_len > window:
            return False
        if getattr(cfg, "partial_rotary_factor", 1.0) != 1.0 or getattr(cfg, "hidden_act", "silu") != "silu":
            return False  # the step rotates whole heads and applies SiLU
        mods = list(model.modules())
        return (all(type(m) is torch.nn.Linear for m in mods if isinstance(m, torch.nn.Linear) or "Linear" in type(m).__name__)
                and not any(m._forward_hooks or m._forward_pre_hooks for m in mods))

    def __init__(self, model, cache, attn: torch.Tensor, max_new_tokens: int, compiled: bool = False):
        base, cfg = model.model, model.config
        n, P = attn.shape
        L = P + max_new_tokens
        if compiled:
            L = cache_bucket(L)
        attn0 = base.layers[0].self_attn
        D = attn0.head_dim
        self.heads = (cfg.num_attention_heads, cfg.num_key_value_heads, D)
        self.scale, self.eps = attn0.scaling, base.norm.variance_epsilon
        self.weights = PackedWeights(model).weights  # decode_step's layout
        self.cos, self.sin = rotary_tables(base, cache.layers[0].keys, L)  # (L, D) each
        self.k, self.v = [], []
        for layer in cache.layers:
            k = layer.keys.new_zeros((n, self.heads[1], L, D))  # (n, kvH, L, D)
            v = torch.zeros_like(k)
            k[:, :, :P], v[:, :, :P] = layer.keys, layer.values
            self.k.append(k)
            self.v.append(v)
        # Additive attention bias: -inf on left-padding slots; None (no op per step) when nothing is padded.
        pad = torch.nn.functional.pad(attn == 0, (0, L - P))  # (n, L)
        self.bias = (torch.zeros((n, 1, 1, L), dtype=k.dtype, device=attn.device).masked_fill_(
            pad[:, None, None, :], float("-inf")) if bool(pad.any()) else None)  # (n, 1, 1, L)
        self.t, self.L, self.fixed_shape = P, L, compiled
        self.fn = compiled_decode_step(n, L) if compiled else decode_step

    def select(self, idx: torch.Tensor) -> None:
        self.k = [k[idx] for k in self.k]
        self.v = [v[idx] for v in self.v]
        if self.bias is not None:
            self.bias = self.bias[idx]

    def step(self, tok: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """tok (n,), pos (n,) -> next-token logits (n, V)."""
        t = torch.tensor([self.t], device=tok.device)  # (1,) the cache slot this token fills
        span = self.L if self.fixed_shape else self.t + 1
        logits = self.fn(tok, pos, t, span, self.fixed_shape, self.weights, self.k, self.v, self.cos, self.sin,
                         self.bias, self.heads, self.scale, self.eps)
        self.t += 1
        return logits


def _project(x: torch.Tensor, proj: tuple) -> torch.Tensor:
    mats, b = proj
    y = x @ mats[0] if len(mats) == 1 else torch.cat([x @ w for w in mats], dim=-1)
    return y if b is None else y + b


def decode_step(tok, pos, t, span: int, mask_future: bool, weights, ks, vs, cos, sin, bias, heads, scale: float,
                eps: float) -> torch.Tensor:
    """One token per row through a Llama-family model on a static KV cache -> next-token logits (n, V).

    tok, pos (n,); t (1,): the cache slot this token fills (written in place in every layer's ks/vs,
    each (n, kvH, L, D)); attention covers the first `span` slots, and `mask_future` hides those after t
    (a fixed span for torch.compile). cos, sin (L, D); bias (n, 1, 1, L) or None.
    """
    hq, hkv, D = heads
    n = tok.shape[0]
    embed, layers, norm, lm_head = weights
    c, s = cos[pos][:, None, :], sin[pos][:, None, :]  # (n, 1, D)
    b = None if bias is None else bias[..., :span]  # (n, 1, 1, span)
    if mask_future:
        future = torch.zeros(span, dtype=cos.dtype, device=cos.device).masked_fill(
            torch.arange(span, device=cos.device) > t, float("-inf"))  # (span,)
        b = future if b is None else b + future
    h = F.embedding(tok, embed)  # (n, H): 2-D activations take the cheaper matmul path
    H = (h.shape[-1],)
    for (w1, qkv, o_proj, w2, gate_up, down), k, v in zip(layers, ks, vs):
        y = _project(F.rms_norm(h, H, w1, eps), qkv).view(n, hq + 2 * hkv, D)  # (n, Hq + 2 kvH, D)
        qk = y[:, : hq + hkv]  # (n, Hq + kvH, D): q and k heads rotate together
        qk = qk * c + qk.view(n, hq + hkv, 2, D // 2).flip(2).view(n, hq + hkv, D) * s
        k.index_copy_(2, t, qk[:, hq:, None])
        v.index_copy_(2, t, y[:, hq + hkv:, None])
        # One query token: plain matmuls beat the flash kernel at these sizes. Query heads are grouped per
        # key/value head (as HF's repeat_kv orders them), which covers grouped-query attention.
        qg = qk[:, :hq].reshape(n, hkv, hq // hkv, D)  # (n, kvH, G, D)
        scores = qg @ k[:, :, :span].transpose(-1, -2)  # (n, kvH, G, span)
        scores = scores * scale if b is None else torch.add(b, scores, alpha=scale)
        att = scores.softmax(-1) @ v[:, :, :span]  # (n, kvH, G, D)
        h = h + _project(att.reshape(n, hq * D), o_proj)
        g, u = _project(F.rms_norm(h, H, w2, eps), gate_up).chunk(2, dim=-1)  # (n, I) each
        h = h + _project(F.silu(g) * u, down)
    return _project(F.rms_norm(h, H, norm, eps), lm_head)  # (n, V)


_COMPILED_STEP = None
_COMPILED_SHAPES: set[tuple[int, int]] = set()


def compiled_decode_step(rows: int, cache_len: int):
    """`decode_step` through torch.compile, made once per process (its compiled graphs are kept per shape)."""
    global _COMPILED_STEP
    if _COMPILED_STEP is None:
        _COMPILED_STEP = torch.compile(decode_step, dynamic=False, fullgraph=True)
    if (rows, cache_len) not in _COMPILED_SHAPES:
        _COMPILED_SHAPES.add((rows, cache_len))
        log.info("gen_compile: compiling the decode step for %d rows and a cache of %d tokens (once per shape, "
                 "seconds on CPU)", rows, cache_len)
    return _COMPILED_STEP


@torch.no_grad()
def generate(model, prompts: list[list[int]], *, pad_id: int, eos_id: int, max_new_tokens: int,
             temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, min_new_tokens: int = 0,
             generator: torch.Generator | None = None, sample_ids: list[int] | None = None,
             version: int = 0, static: bool = True, compiled: bool = False) -> Samples:
    """Sample one response per prompt. Finished rows leave the batch (their KV cache rows are dropped),
    except with a compiled step, whose shapes stay fixed.
    eos cannot be sampled before `min_new_tokens` (as in HF `min_new_tokens`; benchmarks use it to fix lengths).
    `static`: use the StaticDecoder where the architecture allows (same numbers, less overhead);
    `compiled`: run its step through torch.compile (`gen_compile`).
    On a GPU, vLLM is the rollout engine users run (`rollout_engine`); this decoder is the reference
    engine and the CPU one."""
    from transformers import DynamicCache  # deferred: loading transformers takes seconds

    device = next(model.parameters()).device
    ids, attn = left_pad(prompts, pad_id)  # (B, P)
    ids, attn = ids.to(device), attn.to(device)
    B, P = ids.shape
    tokens = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=device)  # (B, R)
    logps = torch.zeros((B, max_new_tokens), dtype=torch.float32, device=device)  # (B, R)
    lengths = torch.zeros(B, dtype=torch.long, device=device)  # (B,)
    cache = DynamicCache()
    pos = position_ids_from_mask(attn)  # (B, P)
    logits = model(input_ids=ids, attention_mask=attn, position_ids=pos, past_key_values=cache, use_cache=True,
                   logits_to_keep=1).logits[:, -1]  # (B, V)
    decoder = (StaticDecoder(model, cache, attn, max_new_tokens, compiled)
               if static and StaticDecoder.supports(model, P + max_new_tokens)
               else CacheDecoder(model, cache, attn))
    alive = torch.arange(B, device=device)  # (n,) batch rows still in the decoder
    live = torch.ones(B, dtype=torch.bool, device=device)  # (n,) of those, the ones still generating
    next_pos = pos[:, -1] + 1  # (n,)
    for t in range(max_new_tokens):
        ban = eos_id if t < min_new_tokens else None
        tok, lp = sample_token(logits, temperature, top_p, top_k, generator, ban)  # (n,), (n,)
        tokens[alive, t] = tok.masked_fill(~live, pad_id)
        logps[alive, t] = lp.masked_fill(~live, 0.0)
        lengths[alive] += live
        if t == max_new_tokens - 1:
            break
        live = live & (tok != eos_id)
        if not bool(live.all()):
            if not bool(live.any()):
                break
            # Drop finished rows; a compiled step keeps them (fixed shapes) and their tokens are ignored.
            if not decoder.fixed_shape:
                idx = live.nonzero().squeeze(1)
                decoder.select(idx)
                alive, tok, next_pos, live = alive[idx], tok[idx], next_pos[idx], live[idx]
        logits = decoder.step(tok, next_pos)  # (n, V)
        next_pos = next_pos + 1
    return to_samples(ids, attn, tokens, logps, lengths, sample_ids, version)


def to_samples(ids: torch.Tensor, attn: torch.Tensor, tokens: torch.Tensor, logps: torch.Tensor,
               lengths: torch.Tensor, sample_ids: list[int] | None, version: int) -> Samples:
    """ids, attn (B, P); tokens, logps (B, R'); lengths (B,) -> `Samples` on the CPU, responses cut to the
    longest (the one host sync of a call)."""
    B, P = ids.shape
    R = int(lengths.max())
    action_mask = (torch.arange(R, device=ids.device)[None, :] < lengths[:, None]).long()  # (B, R)
    sequences = torch.cat([ids, tokens[:, :R]], dim=1)  # (B, P+R)
    return Samples(
        sequences=sequences.cpu(),
        attention_mask=torch.cat([attn, action_mask], dim=1).cpu(),
        action_mask=action_mask.cpu(),
        rollout_logprobs=(logps[:, :R] * action_mask).cpu(),
        prompt_len=P,
        sample_ids=list(sample_ids) if sample_ids is not None else list(range(B)),
        version=version,
    )


def generate_chunked(model, prompts: list[list[int]], chunk: int | None, *, pad_id: int,
                     sample_ids: list[int] | None = None, **kw) -> Samples:
    """`generate` over chunks of `chunk` prompts (None = all at once), merged in prompt order: only one
    chunk's KV cache and logits are alive at a time.

    With several chunks, prompts are first sorted by length (stable), so each chunk pads its prompts to
    about their own length (length buckets), and the rows are put back in prompt order after the merge.
    The chunks draw from the one `generator` in `kw` in that sorted order, so a seeded call is
    reproducible (its rows draw in another order than one unchunked call, or than before the sort).
    """
    ids = list(sample_ids) if sample_ids is not None else list(range(len(prompts)))
    size = chunk or len(prompts)
    order = list(range(len(prompts)))
    if size < len(prompts):
        order.sort(key=lambda i: len(prompts[i]))

    def run(rows: list[int]) -> Samples:
        ps, sids = [prompts[i] for i in rows], [ids[i] for i in rows]
        return generate(model, ps, pad_id=pad_id, sample_ids=sids, **kw)

    merged = merge_samples([run(order[i:i + size]) for i in range(0, len(prompts), size)], pad_id)
    if order == sorted(order):
        return merged
    return select_samples(merged, sorted(range(len(order)), key=order.__getitem__))  # back to prompt order
