"""sample_token's top-k / top-p truncation against a plain reference computation, with fixed generators."""

import pytest
import torch

from rlhf_dist.rollout.decode import sample_token

V = 50


def logits(n: int, seed: int = 0) -> torch.Tensor:  # (n, V)
    return torch.randn((n, V), generator=torch.Generator().manual_seed(seed)) * 3


def nucleus(row: torch.Tensor, p: float) -> set[int]:
    """Plain top-p: take tokens by decreasing probability until their mass reaches p."""
    probs = row.softmax(-1).tolist()
    kept, mass = set(), 0.0
    for i in sorted(range(len(probs)), key=lambda i: -probs[i]):
        if mass >= p:
            break
        kept.add(i)
        mass += probs[i]
    return kept


def draws(x: torch.Tensor, n: int, **kw) -> torch.Tensor:
    """n draws per row of x (N, V) -> tokens (n, N), one fixed generator."""
    g = torch.Generator().manual_seed(1)
    return torch.stack([sample_token(x, generator=g, **kw)[0] for _ in range(n)])


@pytest.mark.parametrize("kw", [{"top_p": 1.0, "top_k": 1}, {"top_p": 1e-6, "top_k": 0}, {"top_p": 1e-6, "top_k": 5}])
def test_top_k_one_and_tiny_top_p_are_argmax(kw):
    x = logits(8)
    tokens = draws(x, 20, temperature=1.0, **kw)  # (20, 8)
    assert (tokens == x.argmax(-1)).all()


@pytest.mark.parametrize("k", [2, 5, 17])
def test_top_k_never_samples_outside_the_k_largest(k):
    x = logits(6, seed=k)
    allowed = x.topk(k, dim=-1).indices  # (6, k)
    tokens = draws(x, 400, temperature=1.5, top_p=1.0, top_k=k)  # (400, 6)
    for r in range(x.shape[0]):
        seen = set(tokens[:, r].tolist())
        assert seen <= set(allowed[r].tolist())
        assert len(seen) > 1  # still a sample, not argmax


@pytest.mark.parametrize("p", [0.3, 0.7, 0.9])
def test_top_p_keeps_the_smallest_set_reaching_p(p):
    x = logits(6, seed=3)
    temperature = 0.8
    tokens = draws(x, 400, temperature=temperature, top_p=p, top_k=0)  # (400, 6)
    for r in range(x.shape[0]):
        kept = nucleus(x[r] / temperature, p)
        seen = set(tokens[:, r].tolist())
        assert seen <= kept
        if len(kept) > 1:
            assert len(seen) > 1


def test_truncated_draws_follow_the_renormalised_distribution():
    """Draw frequencies match softmax restricted to top-k then top-p (renormalised), within sampling error."""
    x = logits(1, seed=7)
    k, p, n = 8, 0.8, 4000
    tokens = draws(x, n, temperature=1.0, top_p=p, top_k=k)[:, 0]  # (n,)
    top = x[0].topk(k).indices
    restricted = torch.full((V,), float("-inf"))
    restricted[top] = x[0, top]
    kept = sorted(nucleus(restricted, p))
    ref = torch.zeros(V)
    ref[kept] = x[0, kept].softmax(-1)
    freq = torch.bincount(tokens, minlength=V).float() / n
    assert (freq - ref).abs().max() < 0.03


def test_logprob_is_the_untruncated_softmax_and_ban_is_never_drawn():
    x = logits(8)
    g = torch.Generator().manual_seed(0)
    ban = int(x[0].argmax())
    for _ in range(50):
        tok, lp = sample_token(x, 0.7, 0.9, 10, g, ban=ban)  # (8,), (8,)
        assert ban not in tok.tolist()
        ref = torch.log_softmax(x / 0.7, -1).gather(1, tok[:, None]).squeeze(1)
        torch.testing.assert_close(lp, ref)


def test_same_generator_seed_same_tokens():
    x = logits(8)
    a, b = (sample_token(x, 1.0, 0.9, 20, torch.Generator().manual_seed(5))[0] for _ in range(2))
    assert torch.equal(a, b)


def reference_truncated(logp: torch.Tensor, top_p: float, top_k: int, ban: int | None) -> torch.Tensor:
    """The straightforward truncation over the whole vocabulary: ban, mask below the k-th largest, sort
    everything for top-p -> logprobs (N, V) with -inf where cut."""
    x = logp.clone()
    if ban is not None:
        x[:, ban] = float("-inf")
    if top_k:
        x = x.masked_fill(x < x.topk(top_k, dim=-1).values[:, -1:], float("-inf"))
    if top_p < 1.0:
        s, order = x.sort(-1, descending=True)
        probs = s.softmax(-1)
        x = x.scatter(-1, order, s.masked_fill(probs.cumsum(-1) - probs > top_p, float("-inf")))
    return x


@pytest.mark.parametrize("top_p,top_k,ban", [(1.0, 7, None), (0.6, 0, None), (0.9, 12, 3), (0.5, 40, None),
                                            (0.95, 0, 1), (1.0, 0, 2)])
def test_truncate_keeps_the_reference_distribution(top_p, top_k, ban):
    """The topk-based path (no sort of the vocabulary when top_k is set) leaves exactly the distribution the
    full-vocabulary reference leaves, on random logits without ties."""
    from rlhf_dist.rollout.decode import truncate

    x = torch.randn((16, 1000), generator=torch.Generator().manual_seed(top_k)) * 2  # continuous: no ties
    logp = torch.log_softmax(x, -1)
    cand, idx = truncate(logp, top_p, top_k, ban)  # (16, C)
    if top_k:
        assert cand.shape == (16, top_k)
    got = cand.softmax(-1) if idx is None else torch.zeros_like(logp).scatter(1, idx, cand.softmax(-1))
    want = reference_truncated(logp, top_p, top_k, ban).softmax(-1)
    assert torch.equal(got > 0, want > 0)  # the same kept set
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
