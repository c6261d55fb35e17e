"""Log-probs and entropy projected chunk by chunk (no full (B, R, V) logits), against the plain computation."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from rlhf_dist.algo import (
    aggregate_loss,
    chunked_logprobs,
    entropy_from_logits,
    kl_penalty,
    logprobs_from_logits,
    masked_mean,
    ppo_policy_loss,
)
from rlhf_dist.steps.forwards import plain_lm_head, response_logits, response_logprobs, response_logprobs_entropy
from rlhf_dist.steps.records import Experience
from rlhf_dist.steps.update import policy_loss


def plain(hidden, weight, targets, temperature, bias=None):  # (N, H), (V, H), (N,) -> (N,), (N,)
    logits = torch.nn.functional.linear(hidden, weight, bias) / temperature  # (N, V)
    logp = torch.log_softmax(logits, -1).gather(-1, targets[:, None])[:, 0]
    return logp, -(torch.softmax(logits, -1) * torch.log_softmax(logits, -1)).sum(-1)


@pytest.mark.parametrize("chunk", [1, 3, 7, 64])  # N = 7: chunks that divide it, that do not, one chunk
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_values_and_gradients_match_plain(chunk, temperature):
    g = torch.Generator().manual_seed(0)
    N, H, V = 7, 5, 11
    h = torch.randn(N, H, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(V, H, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(V, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, V, (N,), generator=g)
    c1, c2 = torch.randn(N, generator=g, dtype=torch.float64), torch.randn(N, generator=g, dtype=torch.float64)

    lp, ent = chunked_logprobs(h, w, t, chunk, temperature, with_entropy=True, bias=b)
    assert lp.dtype == torch.float64
    grads = torch.autograd.grad((c1 * lp + c2 * ent).sum(), (h, w, b))
    lp0, ent0 = plain(h, w, t, temperature, b)
    grads0 = torch.autograd.grad((c1 * lp0 + c2 * ent0).sum(), (h, w, b))
    assert torch.allclose(lp, lp0) and torch.allclose(ent, ent0)
    for a, e in zip(grads, grads0):
        assert torch.allclose(a, e)


def test_without_entropy_and_empty():
    h, w, t = torch.randn(4, 3), torch.randn(6, 3), torch.tensor([0, 5, 2, 2])
    lp, ent = chunked_logprobs(h, w, t, 3)
    assert ent is None and torch.allclose(lp, plain(h, w, t, 1.0)[0], atol=1e-6)
    lp, ent = chunked_logprobs(h[:0], w, t[:0], 3, with_entropy=True)
    assert lp.shape == (0,) and ent.shape == (0,)


def test_bf16_is_the_upcast_of_the_bf16_projection():
    """As `lm_head(h).float()`: project in bf16, then log-softmax in float32."""
    h, w, t = torch.randn(5, 8).bfloat16(), torch.randn(13, 8).bfloat16(), torch.randint(0, 13, (5,))
    lp, ent = chunked_logprobs(h, w, t, 2, with_entropy=True)
    logits = (h @ w.T).float()[None]  # (1, N, V)
    assert lp.dtype == torch.float32
    assert torch.allclose(lp, logprobs_from_logits(logits, t[None])[0], atol=1e-6)
    assert torch.allclose(ent, entropy_from_logits(logits)[0], atol=1e-6)


@pytest.fixture(scope="module")
def lm():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4, max_position_embeddings=64)
    return LlamaForCausalLM(cfg)


def batch(B=3, P=4, R=6, V=97):
    g = torch.Generator().manual_seed(1)
    seq = torch.randint(0, V, (B, P + R), generator=g)  # (B, P+R)
    attn = torch.ones(B, P + R, dtype=torch.long)
    attn[0, :2] = 0  # left-padded prompt
    attn[1, -2:] = 0  # right-padded response
    return seq, attn, P


def test_response_logprobs_match_full_logits(lm):
    seq, attn, P = batch()
    assert plain_lm_head(lm) is lm.lm_head
    logits = response_logits(lm, seq, attn, P, 0.8)  # (B, R, V)
    logp, ent = response_logprobs_entropy(lm, seq, attn, P, 0.8, entropy_rows=None, chunk=4)
    assert torch.allclose(logp, logprobs_from_logits(logits, seq[:, P:]), atol=1e-5)
    assert torch.allclose(ent, entropy_from_logits(logits), atol=1e-5)
    logp2, sample = response_logprobs_entropy(lm, seq, attn, P, 0.8, entropy_rows=1, chunk=4)
    assert sample.shape == (1, seq.shape[1] - P) and not sample.requires_grad
    assert torch.allclose(sample, ent[:1], atol=1e-5) and torch.allclose(logp2, logp)
    assert torch.equal(response_logprobs(lm, seq, attn, P, 0.8), logp2)


def test_a_hooked_lm_head_takes_the_full_logits_path(lm):
    seq, attn, P = batch()
    bias = torch.zeros(lm.config.vocab_size)
    bias[3] = 5.0
    handle = lm.lm_head.register_forward_hook(lambda mod, inp, out: out + bias)
    try:
        assert plain_lm_head(lm) is None
        lp = response_logprobs(lm, seq, attn, P)
        assert torch.allclose(lp, logprobs_from_logits(response_logits(lm, seq, attn, P), seq[:, P:]))
    finally:
        handle.remove()
    assert plain_lm_head(lm) is lm.lm_head


def experience(seq, attn, P):
    B, R = seq.shape[0], seq.shape[1] - P
    z, mask = torch.zeros(B, R), attn[:, P:].float()
    adv = torch.randn(B, R, generator=torch.Generator().manual_seed(2))
    return Experience(seq, attn, mask, P, z - 4.0, z - 4.6, z, torch.zeros(B), z, z, adv, z, list(range(B)), 0)


@pytest.mark.parametrize("entropy_coef", [0.0, 0.05])
def test_policy_loss_gradients_match_full_logits(lm, entropy_coef):
    """The chunked policy loss against the same loss on the full logits (`plain_lm_head` None)."""
    seq, attn, P = batch()
    exp = experience(seq, attn, P)
    kw = {"clip_range": 0.2, "entropy_coef": entropy_coef, "temperature": 0.9, "kl_coef": 0.1}

    lm.zero_grad()
    loss, stats = policy_loss(lm, exp, **kw)
    loss.backward()
    grads = [p.grad.clone() for p in lm.parameters()]

    lm.zero_grad()
    logits = response_logits(lm, seq, attn, P, 0.9)  # (B, R, V)
    mask = exp.action_mask
    logp = logprobs_from_logits(logits, seq[:, P:])
    loss0, _ = ppo_policy_loss(logp, exp.old_logprobs, exp.advantages, mask, 0.2)
    loss0 = loss0 + 0.1 * aggregate_loss(kl_penalty(logp, exp.ref_logprobs, "k3"), mask, "token_mean")
    ent = entropy_from_logits(logits)  # (B, R)
    loss0 = loss0 - entropy_coef * aggregate_loss(ent, mask, "token_mean")
    loss0.backward()

    assert torch.allclose(loss, loss0, atol=1e-6)
    for p, g in zip(lm.parameters(), grads):
        assert torch.allclose(g, p.grad, atol=1e-6)
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 for v in stats.values())  # no host sync
    # The logged entropy: every row when it is trained, else the first sequence's (a sample).
    rows = None if entropy_coef > 0 else 1
    assert float(stats["entropy"]) == pytest.approx(float(masked_mean(ent[:rows].detach(), mask[:rows])), abs=1e-5)
