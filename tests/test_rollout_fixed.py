"""The fixed-shape decode path (rollout/fixed.py), run on CPU with graphs off: the same slots, static
buffers and step as on a GPU, where the step is a captured CUDA graph (not run here: no GPU)."""

import pytest
import torch
from conftest import assert_in_nucleus, tiny_llama

from rlhf_dist.data import encode_prompt
from rlhf_dist.models import load_causal_lm, load_tokenizer
from rlhf_dist.online.experience import response_logits, response_logprobs
from rlhf_dist.rollout.decode import CACHE_BUCKET, cache_bucket, generate
from rlhf_dist.rollout.engine import HFDecodeEngine, SamplingParams
from rlhf_dist.rollout.fixed import FixedDecoder, capture, row_bucket

MIXED = ["Hi", "What do you think of this movie? Tell me more.", "Describe the cat.", "Park?",
         "How was the city at night, and the food?"]  # mixed lengths: left padding on most rows


@pytest.fixture(scope="module")
def model_tok(tiny):
    return load_causal_lm(str(tiny["model"])).eval(), load_tokenizer(str(tiny["model"]))


def prompts(tok, texts):
    return [encode_prompt(tok, [{"role": "user", "content": t}]) for t in texts]


def test_buckets():
    assert [row_bucket(n) for n in (1, 2, 3, 5, 8, 9, 64, 65)] == [1, 2, 4, 8, 8, 16, 64, 128]
    assert [cache_bucket(n) for n in (1, CACHE_BUCKET, CACHE_BUCKET + 1)] == [CACHE_BUCKET, CACHE_BUCKET, 2 * CACHE_BUCKET]


def test_capture_without_graphs_replays_into_one_output():
    """The eager stand-in for a CUDA graph: `out` is fixed, and a replay recomputes it from the buffers."""
    x = torch.ones(3)
    replay, out = capture(lambda: x * 2, graphs=False)
    x.fill_(5)
    replay()
    assert out.tolist() == [10.0, 10.0, 10.0]


@pytest.mark.parametrize("kv_heads", [4, 2])  # 2: grouped-query attention
@pytest.mark.parametrize("check_every", [1, 3])
def test_fixed_greedy_matches_the_dropping_decoder_and_the_forward(tiny, kv_heads, check_every):
    """Greedy, left-padded mixed lengths, rows ending at different steps (batch 6 padded to 8 rows): the
    same tokens, lengths and logprobs as decode.generate (which drops finished rows) and the plain forward."""
    model, tok = tiny_llama(tiny, kv_heads)
    ps = prompts(tok, ["Hi", "Describe the cat.", "What do you think of this movie? Tell me more."] * 2)
    kw = {"pad_id": tok.pad_token_id, "max_new_tokens": 20, "top_k": 1}
    free = generate(model, ps, eos_id=-1, **kw)
    eos = int(free.responses[0, 5])  # an "eos" row 0 emits by its 6th token; other rows later or never
    ends = [row.tolist().index(eos) + 1 if eos in row.tolist() else 20 for row in free.responses]
    assert min(ends) <= 6 and max(ends) == 20, ends
    want = generate(model, ps, eos_id=eos, **kw)
    got = FixedDecoder(model, check_every=check_every).generate(ps, eos_id=eos, **kw)
    assert got.action_mask.sum(1).tolist() == ends
    assert torch.equal(got.sequences, want.sequences) and torch.equal(got.action_mask, want.action_mask)
    torch.testing.assert_close(got.rollout_logprobs, want.rollout_logprobs, atol=1e-5, rtol=0)
    with torch.no_grad():
        lp = response_logprobs(model, got.sequences, got.attention_mask, got.prompt_len)
    assert ((lp - got.rollout_logprobs).abs() * got.action_mask).max() < 1e-4


@pytest.mark.parametrize("top_p,top_k", [(1.0, 0), (0.8, 0), (1.0, 5), (0.9, 8)])
def test_fixed_sampling_matches_the_plain_forward(model_tok, top_p, top_k):
    """Sampled with a fixed generator through the engine's fixed-shape path: every token lies in the
    truncated set of the plain forward's distribution, its logprob is that forward's, and a seed repeats."""
    model, tok = model_tok
    ps = prompts(tok, MIXED * 2)  # 10 rows: a bucket of 16
    sp = SamplingParams(max_new_tokens=12, temperature=0.7, top_p=top_p, top_k=top_k, check_every=4)
    engine = HFDecodeEngine(model, fixed_shape=True)
    a, b = (engine.generate(ps, sp, pad_id=tok.pad_token_id, eos_id=tok.eos_token_id,
                            generator=torch.Generator().manual_seed(3)) for _ in range(2))
    assert engine._fixed is not None and len(engine._fixed.slots) == 1
    assert torch.equal(a.sequences, b.sequences) and torch.equal(a.rollout_logprobs, b.rollout_logprobs)
    with torch.no_grad():
        probs = (response_logits(model, a.sequences, a.attention_mask, a.prompt_len, 1.0).float()
                 / sp.temperature).softmax(-1)  # (B, R, V)
        lp = response_logprobs(model, a.sequences, a.attention_mask, a.prompt_len, sp.temperature)
    m = a.action_mask.bool()  # (B, R)
    assert_in_nucleus(probs, a.responses, m, top_p, top_k)
    torch.testing.assert_close(a.rollout_logprobs[m], lp[m], atol=1e-4, rtol=0)


def test_slots_are_reused_per_bucket_and_evicted(model_tok):
    """Batches of 5 and 7 share the 8-row slot (its cache reloaded, stale rows and slots cleared) and
    give what a fresh decoder gives; a new bucket beyond max_slots drops the least recently used."""
    model, tok = model_tok
    kw = {"pad_id": tok.pad_token_id, "eos_id": tok.eos_token_id, "max_new_tokens": 8, "top_k": 1}
    ps = prompts(tok, MIXED + MIXED[:2])
    dec = FixedDecoder(model, max_slots=1)
    first = dec.generate(ps, **kw)
    slot = next(iter(dec.slots.values()))
    again = dec.generate(ps[:5], **kw)
    assert list(dec.slots.values()) == [slot] and slot.rows == 8
    fresh = FixedDecoder(model).generate(ps[:5], **kw)
    assert torch.equal(again.sequences, fresh.sequences)
    assert torch.equal(first.sequences[:5, :again.sequences.shape[1]], again.sequences)
    dec.generate(ps[:2], **kw)  # a 2-row bucket: replaces the 8-row slot
    assert [s.rows for s in dec.slots.values()] == [2]


def test_a_failed_capture_falls_back_to_the_eager_step(model_tok, caplog):
    """graphs=True where no graph can be captured (here: no CUDA) warns once and decodes without graphs,
    giving the eager path's tokens."""
    model, tok = model_tok
    kw = {"pad_id": tok.pad_token_id, "eos_id": tok.eos_token_id, "max_new_tokens": 6, "top_k": 1}
    ps = prompts(tok, MIXED)
    dec = FixedDecoder(model, graphs=True)
    with caplog.at_level("WARNING"):
        out = dec.generate(ps, **kw)
    assert not dec.graphs and "CUDA graph capture failed" in caplog.text
    assert torch.equal(out.sequences, FixedDecoder(model, graphs=False).generate(ps, **kw).sequences)


def test_update_weights_repacks_the_fixed_decoder(tiny):
    """A sync writes the parameters in place; `update_weights` refreshes the packed copies the step (a graph,
    on a GPU) reads, so the next generate uses the new weights, through the same slot."""
    from transformers import AutoConfig, LlamaForCausalLM

    cfg = AutoConfig.from_pretrained(tiny["model"])
    torch.manual_seed(1)
    src, dst = (LlamaForCausalLM(cfg).eval() for _ in range(2))
    tok = load_tokenizer(str(tiny["model"]))
    engine = HFDecodeEngine(dst, fixed_shape=True)
    ps, sp = prompts(tok, MIXED), SamplingParams(max_new_tokens=8, top_k=1)
    before = engine.generate(ps, sp, pad_id=tok.pad_token_id, eos_id=tok.eos_token_id)
    assert engine._fixed.packed.pack  # copies, which go stale without a repack
    with torch.no_grad():
        for p, q in zip(dst.parameters(), src.parameters()):
            p.copy_(q)
    engine.update_weights(1)
    got = engine.generate(ps, sp, pad_id=tok.pad_token_id, eos_id=tok.eos_token_id)
    want = HFDecodeEngine(src, fixed_shape=False).generate(ps, sp, pad_id=tok.pad_token_id, eos_id=tok.eos_token_id)
    assert len(engine._fixed.slots) == 1 and got.version == 1
    assert torch.equal(got.sequences, want.sequences) and not torch.equal(before.sequences, want.sequences)


def test_engine_takes_the_fixed_path_only_on_cuda_or_when_asked(model_tok):
    model, _tok = model_tok
    sp = SamplingParams(max_new_tokens=4)
    assert HFDecodeEngine(model)._fixed_decoder(sp, 32) is None  # CPU: decode.generate
    assert HFDecodeEngine(model, fixed_shape=True)._fixed_decoder(sp, 32) is not None
    handle = model.lm_head.register_forward_hook(lambda mod, inp, out: out)  # unsupported: the generic forward
    try:
        assert HFDecodeEngine(model, fixed_shape=True)._fixed_decoder(sp, 32) is None
    finally:
        handle.remove()


@pytest.mark.parametrize("fixed_shape", [False, True])
def test_chunks_sorted_by_length_come_back_in_prompt_order(model_tok, fixed_shape):
    """gen_batch_size chunks are made of prompts of similar length; rows and sample_ids return in prompt
    order, each greedy row the same as decoding all prompts at once."""
    model, tok = model_tok
    ps = prompts(tok, MIXED * 2)
    ids = [100 + i for i in range(len(ps))]
    engine = HFDecodeEngine(model, fixed_shape=fixed_shape)
    kw = {"pad_id": tok.pad_token_id, "eos_id": tok.eos_token_id, "sample_ids": ids}
    whole, chunked = (engine.generate(ps, SamplingParams(max_new_tokens=6, top_k=1, batch_size=b), **kw)
                      for b in (None, 3))
    assert chunked.sample_ids == ids
    assert torch.equal(chunked.sequences, whole.sequences)
    torch.testing.assert_close(chunked.rollout_logprobs, whole.rollout_logprobs, atol=1e-5, rtol=0)


@pytest.mark.parametrize("check_every", [1, 2, 4, 8])
def test_finished_rows_are_checked_every_k_steps(model_tok, monkeypatch, check_every):
    """The loop reads `live.any()` only every check_every steps: a row ending at its e-th token stops the
    loop at the first multiple of check_every from e (steps after e are wasted, the result unchanged)."""
    from rlhf_dist.rollout import fixed

    model, tok = model_tok
    ps = prompts(tok, ["Describe the cat."])
    kw = {"pad_id": tok.pad_token_id, "max_new_tokens": 20, "top_k": 1}
    free = generate(model, ps, eos_id=-1, **kw).responses[0].tolist()
    eos = free[2]
    e = free.index(eos) + 1  # the row ends with its e-th token (e <= 3)
    calls = []
    step = fixed.Slot.step
    monkeypatch.setattr(fixed.Slot, "step", lambda self, t, p: calls.append(1) or step(self, t, p))
    got = FixedDecoder(model, check_every=check_every).generate(ps, eos_id=eos, **kw)
    assert len(calls) == -(-e // check_every) * check_every - 1  # a step per token but the last one checked
    assert got.responses[0].tolist() == free[:e]
