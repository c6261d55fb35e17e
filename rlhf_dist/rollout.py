"""rollout: prompts -> responses, with a KV cache, left-padded batches and no work on finished rows."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .models import position_ids_from_mask


@dataclass
class Samples:
    """What the rollout role returns for a batch of prompts."""

    sequences: torch.Tensor  # (B, P+R) long: left-padded prompt, then right-padded response
    attention_mask: torch.Tensor  # (B, P+R) long: 1 on real prompt and response tokens
    action_mask: torch.Tensor  # (B, R) long: 1 on generated tokens, eos included
    rollout_logprobs: torch.Tensor  # (B, R) float: logprob of each sampled token under the rollout weights
    prompt_len: int  # P
    sample_ids: list[int]  # index of each row's prompt in the prompt file
    version: int  # weight version that generated the batch

    @property
    def responses(self) -> torch.Tensor:  # (B, R)
        return self.sequences[:, self.prompt_len:]

    def __len__(self) -> int:
        return self.sequences.shape[0]


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """-> ids (B, P), attention mask (B, P)."""
    P = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), P), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), P), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, P - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, P - len(p):] = 1
    return ids, mask


def sample_token(logits: torch.Tensor, temperature: float, top_p: float, top_k: int,
                 generator: torch.Generator | None, ban: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (N, V) -> token (N,), logprob (N,) of that token under softmax(logits / temperature).

    The logprob ignores top-k/top-p truncation and the `ban`ned token, as the learner scores with the
    same plain softmax: the rollout's logprobs can stand in for the learner's old logprobs.
    """
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)  # (N, V)
    filtered = logp
    if ban is not None:
        filtered = filtered.clone()
        filtered[:, ban] = float("-inf")
    if top_k and top_k < logp.shape[-1]:
        kth = torch.topk(filtered, top_k, dim=-1).values[:, -1:]  # (N, 1)
        filtered = filtered.masked_fill(filtered < kth, float("-inf"))
    if top_p < 1.0:
        sorted_lp, order = torch.sort(filtered, descending=True)  # (N, V)
        cum = sorted_lp.exp().cumsum(-1)
        drop = cum - sorted_lp.exp() > top_p  # keep the smallest prefix whose mass reaches top_p
        filtered = filtered.scatter(-1, order, sorted_lp.masked_fill(drop, float("-inf")))
    # Inverse-CDF sampling: one uniform per row. torch.multinomial draws an exponential per vocabulary
    # entry, which took 12% of a decode step here (scripts/bench_ppo.py --decode).
    cdf = filtered.exp().cumsum(-1)  # (N, V)
    u = torch.rand((cdf.shape[0], 1), generator=generator, device=cdf.device) * cdf[:, -1:]  # (N, 1)
    token = torch.searchsorted(cdf, u, right=True).squeeze(1).clamp_(max=cdf.shape[1] - 1)  # (N,)
    return token, logp.gather(1, token[:, None]).squeeze(1)


class CacheDecoder:
    """One decode step through the model's own forward and a transformers DynamicCache (any architecture)."""

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
    table, concatenating the cache.

    Models of at most PACK_MAX_BYTES of weights are copied once per `generate` call (a weight sync never
    lands inside a call) into the layout a step wants: q/k/v and gate/up fused into one matrix each, every
    matrix transposed to (in, out). On the benchmark model that made decoding 0.98-1.13x as fast, about
    1.09x typically (docs/benchmarks.md). Larger models use their own weights by reference: the copy
    would double the rollout's weight memory for the length of a call.
    """

    ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
    PACK_MAX_BYTES = 256 * 2**20

    @classmethod
    def supports(cls, model, total_len: int) -> bool:
        """Only plain modules: an adapter (e.g. a LoRA layer in place of nn.Linear) or a forward hook
        changes what a module computes, which the functional step would bypass."""
        window = getattr(model.config, "sliding_window", None)
        if type(model).__name__ not in cls.ARCHITECTURES or model.training:
            return False
        if window and getattr(model.config, "use_sliding_window", True) and total_len > window:
            return False
        if getattr(model.config, "partial_rotary_factor", 1.0) != 1.0:  # the step rotates whole heads
            return False
        mods = list(model.modules())
        return (all(type(m) is torch.nn.Linear for m in mods if isinstance(m, torch.nn.Linear) or "Linear" in type(m).__name__)
                and not any(m._forward_hooks or m._forward_pre_hooks for m in mods))

    def __init__(self, model, cache, attn: torch.Tensor, max_new_tokens: int):
        base, cfg = model.model, model.config
        n, P = attn.shape
        L = P + max_new_tokens
        attn0 = base.layers[0].self_attn
        self.head_dim, self.scale = attn0.head_dim, attn0.scaling
        self.hq, self.hkv = cfg.num_attention_heads, cfg.num_key_value_heads
        self.embed = base.embed_tokens.weight  # (V, H)
        pack = sum(p.numel() * p.element_size() for p in model.parameters()) <= self.PACK_MAX_BYTES
        self.lm_head = self._linear(pack, model.lm_head)
        self.norm = (base.norm.weight, base.norm.variance_epsilon)
        self.layers = [self._layer(layer, pack) for layer in base.layers]
        cos, sin = base.rotary_emb(cache.layers[0].keys, torch.arange(L, device=attn.device)[None])  # (1, L, D)
        half = self.head_dim // 2
        # rotate_half(x) * sin == swap_halves(x) * [-sin_1, sin_2]: the sign goes into the table once.
        self.cos, self.sin = cos[0], torch.cat([-sin[0, :, :half], sin[0, :, half:]], dim=-1)  # (L, D)
        self.k, self.v = [], []
        for layer in cache.layers:
            k = layer.keys.new_zeros((n, self.hkv, L, self.head_dim))  # (n, kvH, L, D)
            v = torch.zeros_like(k)
            k[:, :, :P], v[:, :, :P] = layer.keys, layer.values
            self.k.append(k)
            self.v.append(v)
        # Additive attention bias: -inf on left-padding slots; None (no op per step) when nothing is padded.
        pad = torch.nn.functional.pad(attn == 0, (0, max_new_tokens))  # (n, L)
        self.bias = (torch.zeros((n, 1, 1, L), dtype=k.dtype, device=attn.device).masked_fill_(
            pad[:, None, None, :], float("-inf")) if bool(pad.any()) else None)  # (n, 1, 1, L)
        self.t = P

    @classmethod
    def _layer(cls, layer, pack: bool) -> tuple:
        a, m = layer.self_attn, layer.mlp
        return (layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon,
                cls._linear(pack, a.q_proj, a.k_proj, a.v_proj), cls._linear(pack, a.o_proj),
                layer.post_attention_layernorm.weight, layer.post_attention_layernorm.variance_epsilon,
                cls._linear(pack, m.gate_proj, m.up_proj), cls._linear(pack, m.down_proj), m.act_fn)

    @staticmethod
    def _linear(pack: bool, *linears):
        """-> a function x (n, in) -> the outputs of `linears` side by side (n, sum of outs)."""
        import torch.nn.functional as F

        if pack:
            w = torch.cat([l.weight for l in linears]).t().contiguous()  # (in, sum of outs)
            b = None if linears[0].bias is None else torch.cat([l.bias for l in linears])
            return (lambda x: x @ w) if b is None else (lambda x: torch.addmm(b, x, w))
        if len(linears) == 1:
            return lambda x: F.linear(x, linears[0].weight, linears[0].bias)
        return lambda x: torch.cat([F.linear(x, l.weight, l.bias) for l in linears], dim=-1)

    def select(self, idx: torch.Tensor) -> None:
        self.k = [k[idx] for k in self.k]
        self.v = [v[idx] for v in self.v]
        if self.bias is not None:
            self.bias = self.bias[idx]

    def step(self, tok: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """tok (n,), pos (n,) -> next-token logits (n, V)."""
        import torch.nn.functional as F

        n, t, D, hq, hkv = tok.shape[0], self.t, self.head_dim, self.hq, self.hkv
        cos, sin = self.cos[pos][:, None, :], self.sin[pos][:, None, :]  # (n, 1, D)
        bias = None if self.bias is None else self.bias[..., : t + 1]  # (n, 1, 1, t+1)
        h = F.embedding(tok, self.embed)  # (n, H): 2-D activations take the cheaper matmul path
        H = (h.shape[-1],)
        for i, (w1, e1, qkv, o_proj, w2, e2, gate_up, down, act) in enumerate(self.layers):
            y = qkv(F.rms_norm(h, H, w1, e1)).view(n, hq + 2 * hkv, D)  # (n, Hq + 2 kvH, D)
            qk = y[:, : hq + hkv]  # (n, Hq + kvH, D): q and k heads rotate together
            qk = qk * cos + qk.view(n, hq + hkv, 2, D // 2).flip(2).view(n, hq + hkv, D) * sin
            self.k[i][:, :, t] = qk[:, hq:]
            self.v[i][:, :, t] = y[:, hq + hkv:]
            # One query token: plain matmuls beat the flash kernel at these sizes. Query heads are grouped
            # per key/value head (as HF's repeat_kv orders them), which covers grouped-query attention.
            qg = qk[:, :hq].reshape(n, hkv, hq // hkv, D)  # (n, kvH, G, D)
            scores = qg @ self.k[i][:, :, : t + 1].transpose(-1, -2)  # (n, kvH, G, t+1)
            scores = scores * self.scale if bias is None else torch.add(bias, scores, alpha=self.scale)
            att = scores.softmax(-1) @ self.v[i][:, :, : t + 1]  # (n, kvH, G, D)
            h = h + o_proj(att.reshape(n, hq * D))
            gu = gate_up(F.rms_norm(h, H, w2, e2))  # (n, 2I)
            g, u = gu.chunk(2, dim=-1)
            h = h + down(act(g) * u)
        self.t += 1
        return self.lm_head(F.rms_norm(h, H, *self.norm))  # (n, V)


@torch.no_grad()
def generate(model, prompts: list[list[int]], *, pad_id: int, eos_id: int, max_new_tokens: int,
             temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, min_new_tokens: int = 0,
             generator: torch.Generator | None = None, sample_ids: list[int] | None = None,
             version: int = 0, static: bool = True) -> Samples:
    """Sample one response per prompt. Finished rows leave the batch (their KV cache rows are dropped).
    eos cannot be sampled before `min_new_tokens` (as in HF `min_new_tokens`; benchmarks use it to fix lengths).
    `static`: use the StaticDecoder where the architecture allows (same numbers, less overhead)."""
    from transformers import DynamicCache

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
    decoder = (StaticDecoder(model, cache, attn, max_new_tokens) if static and StaticDecoder.supports(model, P + max_new_tokens)
               else CacheDecoder(model, cache, attn))
    alive = torch.arange(B, device=device)  # (n,) rows still generating
    next_pos = pos[:, -1] + 1  # (n,)
    for t in range(max_new_tokens):
        ban = eos_id if t < min_new_tokens else None
        tok, lp = sample_token(logits, temperature, top_p, top_k, generator, ban)  # (n,), (n,)
        tokens[alive, t] = tok
        logps[alive, t] = lp
        lengths[alive] = t + 1
        if t == max_new_tokens - 1:
            break
        keep = tok != eos_id  # (n,)
        if not bool(keep.all()):
            if not bool(keep.any()):
                break
            idx = keep.nonzero().squeeze(1)
            decoder.select(idx)
            alive, tok, next_pos = alive[idx], tok[idx], next_pos[idx]
        logits = decoder.step(tok, next_pos)  # (n, V)
        next_pos = next_pos + 1
    R = int(lengths.max())
    action_mask = (torch.arange(R, device=device)[None, :] < lengths[:, None]).long()  # (B, R)
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


def merge_samples(parts: list[Samples], pad_id: int) -> Samples:
    """Concatenate rollouts of several workers, re-padding prompts (left) and responses (right)."""
    if len(parts) == 1:
        return parts[0]
    P = max(s.prompt_len for s in parts)
    R = max(s.action_mask.shape[1] for s in parts)

    def pad(s: Samples):
        lp, rp = P - s.prompt_len, R - s.action_mask.shape[1]
        seq = torch.nn.functional.pad(s.sequences, (lp, rp), value=pad_id)
        attn = torch.nn.functional.pad(s.attention_mask, (lp, rp), value=0)
        return seq, attn, torch.nn.functional.pad(s.action_mask, (0, rp)), torch.nn.functional.pad(s.rollout_logprobs, (0, rp))

    cols = list(zip(*(pad(s) for s in parts)))
    return Samples(torch.cat(cols[0]), torch.cat(cols[1]), torch.cat(cols[2]), torch.cat(cols[3]), P,
                   [i for s in parts for i in s.sample_ids], min(s.version for s in parts))


def slice_samples(s: Samples, start: int, end: int) -> Samples:
    return Samples(s.sequences[start:end], s.attention_mask[start:end], s.action_mask[start:end],
                   s.rollout_logprobs[start:end], s.prompt_len, s.sample_ids[start:end], s.version)
