"""Generation, in one process (no Ray)."""


import pytest
import torch
from conftest import assert_in_nucleus, tiny_llama

from rlhf_dist.data.encode import encode_prompt
from rlhf_dist.models.load import load_causal_lm, load_tokenizer
from rlhf_dist.rollout.decode import generate
from rlhf_dist.rollout.samples import merge_samples, slice_samples, trim_samples
from rlhf_dist.steps.forwards import response_logprobs


@pytest.fixture(scope="module")
def model_tok(tiny):
    return load_causal_lm(str(tiny["model"])).eval(), load_tokenizer(str(tiny["model"]))


def prompts(tok, texts):
    return [encode_prompt(tok, [{"role": "user", "content": t}]) for t in texts]


def test_generation_matches_scoring_and_stops_at_eos(model_tok):
    model, tok = model_tok
    ps = prompts(tok, ["Describe the cat.", "Hi", "What do you think of this movie?"] * 4)
    s = generate(model, ps, pad_id=tok.pad_token_id, eos_id=tok.eos_token_id, max_new_tokens=12,
                 generator=torch.Generator().manual_seed(0))
    # Left-padded prompts, response tokens after position P.
    assert s.sequences.shape == (12, s.prompt_len + s.action_mask.shape[1])
    assert (s.attention_mask[:, s.prompt_len:] == s.action_mask).all()
    for row, mask in zip(s.responses, s.action_mask):
        n = int(mask.sum())
        assert (row[n:] == tok.pad_token_id).all()
        assert tok.eos_token_id not in row[: n - 1].tolist()  # eos only as the last token
    # The rollout's logprobs equal a full forward's (KV cache and left padding are consistent).
    with torch.no_grad():
        lp = response_logprobs(model, s.sequences, s.attention_mask, s.prompt_len)
    assert ((lp - s.rollout_logprobs).abs() * s.action_mask).max() < 1e-4


@pytest.mark.parametrize("kv_heads,pack", [(4, True), (2, True), (4, False)])  # 2: grouped-query attention
def test_static_decoder_matches_the_model_forward(tiny, kv_heads, pack, monkeypatch):
    """The StaticDecoder (weights packed, or by reference as for large models) and the generic forward +
    DynamicCache pick the same greedy tokens with the same logprobs, with left padding and rows leaving
    the batch at eos."""
    from rlhf_dist.rollout import decode
    from rlhf_dist.rollout.decode import StaticDecoder

    model, tok = tiny_llama(tiny, kv_heads)
    ps = prompts(tok, ["Hi", "Describe the cat.", "What do you think of this movie? Tell me more."] * 3)
    assert StaticDecoder.supports(model, 64)
    if not pack:
        monkeypatch.setattr(decode, "PACK_MAX_BYTES", 0)
    outs = [generate(model, ps, pad_id=tok.pad_token_id, eos_id=model.config.eos_token_id, max_new_tokens=24, top_k=1,
                     static=static) for static in (True, False)]
    assert torch.equal(outs[0].sequences, outs[1].sequences)
    assert (outs[0].rollout_logprobs - outs[1].rollout_logprobs).abs().max() < 1e-5
    with torch.no_grad():
        lp = response_logprobs(model, outs[0].sequences, outs[0].attention_mask, outs[0].prompt_len)
    assert ((lp - outs[0].rollout_logprobs).abs() * outs[0].action_mask).max() < 1e-4


def test_compiled_decode_matches_eager_with_padding_and_early_eos(model_tok):
    """gen_compile: the torch.compile'd step on its fixed-shape path (finished rows stay in the batch, the
    whole bucketed cache is attended with later slots masked) picks the same greedy tokens, lengths and
    logprobs as the eager step that drops finished rows."""
    from rlhf_dist.rollout.decode import StaticDecoder

    model, tok = model_tok
    ps = prompts(tok, ["Hi", "Describe the cat.", "What do you think of this movie? Tell me more."] * 2)
    assert StaticDecoder.supports(model, 64)
    kw = {"pad_id": tok.pad_token_id, "max_new_tokens": 20, "top_k": 1}
    free = generate(model, ps, eos_id=-1, **kw)  # no eos: every row runs 20 tokens
    # An "eos" that row 0 emits at its 6th token and some other rows never emit, so rows finish at
    # different steps (the greedy random model repeats itself, so the first occurrence is what counts).
    eos = int(free.responses[0, 5])
    ends = [row.tolist().index(eos) + 1 if eos in row.tolist() else 20 for row in free.responses]
    assert ends[0] <= 6 and max(ends) == 20, ends
    eager, compiled = (generate(model, ps, eos_id=eos, compiled=c, **kw) for c in (False, True))
    assert eager.action_mask.sum(1).tolist() == ends
    assert torch.equal(compiled.sequences, eager.sequences)
    assert torch.equal(compiled.action_mask, eager.action_mask)
    assert (compiled.rollout_logprobs - eager.rollout_logprobs).abs().max() < 1e-5


def test_min_new_tokens_bans_eos_but_keeps_policy_logprobs(model_tok):
    model, tok = model_tok
    ps = prompts(tok, ["Hi", "Describe the cat."] * 4)
    # A bias that makes eos near-certain: without the ban every row would stop at once.
    eos_bias = torch.zeros(model.config.vocab_size)
    eos_bias[tok.eos_token_id] = 20.0
    handle = model.lm_head.register_forward_hook(lambda mod, inp, out: out + eos_bias)
    try:
        s = generate(model, ps, pad_id=tok.pad_token_id, eos_id=tok.eos_token_id, max_new_tokens=10,
                     min_new_tokens=6, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            lp = response_logprobs(model, s.sequences, s.attention_mask, s.prompt_len)
    finally:
        handle.remove()
    lengths = s.action_mask.sum(1)
    assert (lengths == 7).all()  # 6 forced tokens, then eos (the hook also makes this the generic-forward path)
    assert ((lp - s.rollout_logprobs).abs() * s.action_mask).max() < 1e-4  # logprobs of the unbanned softmax


def test_left_padding_does_not_change_results(model_tok):
    model, tok = model_tok
    short, long_ = prompts(tok, ["Hi", "What do you think of this movie? Tell me more."])
    with torch.no_grad():
        # Greedy (top_k=1): this random model has near-tied logits, so even a low temperature samples.
        s_batch = generate(model, [short, long_], pad_id=tok.pad_token_id, eos_id=tok.eos_token_id,
                           max_new_tokens=8, top_k=1)
        s_alone = generate(model, [short], pad_id=tok.pad_token_id, eos_id=tok.eos_token_id, max_new_tokens=8,
                           top_k=1)
    n = int(s_alone.action_mask[0].sum())
    assert s_batch.responses[0, :n].tolist() == s_alone.responses[0, :n].tolist()


def test_top_k_one_is_greedy(model_tok):
    model, tok = model_tok
    ps = prompts(tok, ["Describe the park."])
    a = generate(model, ps, pad_id=tok.pad_token_id, eos_id=tok.eos_token_id, max_new_tokens=6, top_k=1,
                 generator=torch.Generator().manual_seed(1))
    b = generate(model, ps, pad_id=tok.pad_token_id, eos_id=tok.eos_token_id, max_new_tokens=6, top_k=1,
                 generator=torch.Generator().manual_seed(2))
    assert torch.equal(a.sequences, b.sequences)


def test_merge_repads(model_tok):
    model, tok = model_tok
    g = torch.Generator().manual_seed(0)
    a = generate(model, prompts(tok, ["Hi"]), pad_id=tok.pad_token_id, eos_id=tok.eos_token_id, max_new_tokens=4, generator=g)
    b = generate(model, prompts(tok, ["What do you think of the city?"]), pad_id=tok.pad_token_id,
                 eos_id=tok.eos_token_id, max_new_tokens=9, generator=g)
    m = merge_samples([a, b], tok.pad_token_id)
    assert m.prompt_len == max(a.prompt_len, b.prompt_len) and len(m) == 2
    with torch.no_grad():
        lp = response_logprobs(model, m.sequences, m.attention_mask, m.prompt_len)
    assert ((lp - m.rollout_logprobs).abs() * m.action_mask).max() < 1e-4
    # A slice of the merged batch, trimmed, is the part it came from: no column of the other's padding left.
    for part, row in ((a, 0), (b, 1)):
        t = trim_samples(slice_samples(m, row, row + 1))
        assert t.prompt_len == part.prompt_len and t.action_mask.shape == part.action_mask.shape
        for k in ("sequences", "attention_mask", "action_mask", "rollout_logprobs"):
            assert torch.equal(getattr(t, k), getattr(part, k)), k


# ---------------------------------------------------------------------------------------
# The engine (HFDecodeEngine) against a plain teacher-forced forward
# ---------------------------------------------------------------------------------------

MIXED = ["Hi", "What do you think of this movie? Tell me more.", "Describe the cat.", "Park?",
         "How was the city at night, and the food?"]  # mixed lengths: left padding on most rows


def teacher_forced(model, s):
    """The plain forward over the generated sequences -> logits (B, R, V) at temperature 1."""
    from rlhf_dist.steps.forwards import response_logits

    with torch.no_grad():
        return response_logits(model, s.sequences, s.attention_mask, s.prompt_len, 1.0).float()


@pytest.mark.parametrize("static", [True, False])  # the StaticDecoder and the generic forward + DynamicCache
@pytest.mark.parametrize("chunk", [None, 2])  # gen_batch_size: chunks re-padded into one batch
def test_engine_greedy_matches_the_plain_forward(model_tok, static, chunk, monkeypatch):
    from rlhf_dist.rollout import decode
    from rlhf_dist.rollout.engine import HFDecodeEngine, SamplingParams

    model, tok = model_tok
    if not static:
        monkeypatch.setattr(decode.StaticDecoder, "supports", classmethod(lambda cls, m, n: False))
    ps = prompts(tok, MIXED)
    engine = HFDecodeEngine(model)
    s = engine.generate(ps, SamplingParams(max_new_tokens=10, top_k=1, batch_size=chunk), pad_id=tok.pad_token_id,
                        eos_id=tok.eos_token_id)
    assert len({len(p) for p in ps}) > 1 and s.sequences.shape[0] == len(ps)
    for row, p in zip(s.sequences[:, :s.prompt_len], ps):  # left-padded prompts
        assert row[s.prompt_len - len(p):].tolist() == p and (row[:s.prompt_len - len(p)] == tok.pad_token_id).all()
    logits = teacher_forced(model, s)  # (B, R, V)
    m = s.action_mask.bool()  # (B, R)
    assert torch.equal(s.responses[m], logits.argmax(-1)[m])  # greedy: each token is the forward's argmax
    ref = torch.log_softmax(logits, -1).gather(-1, s.responses[..., None]).squeeze(-1)  # (B, R)
    torch.testing.assert_close(s.rollout_logprobs[m], ref[m], atol=1e-4, rtol=0)


@pytest.mark.parametrize("top_p,top_k", [(0.8, 0), (1.0, 5), (0.9, 8)])
def test_engine_sampling_matches_the_plain_forward(model_tok, top_p, top_k):
    """Sampled with top-p / top-k: every token lies in the truncated set of the plain forward's distribution,
    its logprob is that forward's (untruncated, at the temperature), and a fixed generator repeats the batch."""
    from rlhf_dist.rollout.engine import HFDecodeEngine, SamplingParams
    from rlhf_dist.steps.forwards import response_logprobs

    model, tok = model_tok
    ps = prompts(tok, MIXED * 2)
    sp = SamplingParams(max_new_tokens=12, temperature=0.7, top_p=top_p, top_k=top_k)
    engine = HFDecodeEngine(model)
    a, b = (engine.generate(ps, sp, pad_id=tok.pad_token_id, eos_id=tok.eos_token_id,
                            generator=torch.Generator().manual_seed(3)) for _ in range(2))
    assert torch.equal(a.sequences, b.sequences) and torch.equal(a.rollout_logprobs, b.rollout_logprobs)
    probs = (teacher_forced(model, a) / sp.temperature).softmax(-1)  # (B, R, V)
    m = a.action_mask.bool()  # (B, R)
    assert_in_nucleus(probs, a.responses, m, top_p, top_k)
    with torch.no_grad():
        lp = response_logprobs(model, a.sequences, a.attention_mask, a.prompt_len, sp.temperature)
    torch.testing.assert_close(a.rollout_logprobs[m], lp[m], atol=1e-4, rtol=0)


def test_engine_weights_and_version_come_through_the_receiver(tiny):
    """A sync bucket by bucket into `load_bucket` (the IPC path's plain-tensor buckets) then `update_weights`:
    the engine generates as an engine built on the sender's weights, and stamps the new version."""
    from transformers import AutoConfig, LlamaForCausalLM

    from rlhf_dist.roles.weight_sync import WeightReceiver, flatten, make_buckets, param_signature
    from rlhf_dist.rollout.engine import HFDecodeEngine, RolloutEngine, SamplingParams

    cfg = AutoConfig.from_pretrained(tiny["model"])
    src, dst = (LlamaForCausalLM(cfg).eval() for _ in range(2))
    tok = load_tokenizer(str(tiny["model"]))
    engine = HFDecodeEngine(dst)
    assert isinstance(engine, RolloutEngine) and engine.version == 0
    sig = param_signature(src.named_parameters())
    engine.check_signature(sig, "rollout-0")
    receiver = WeightReceiver(sig, engine.load_bucket, bucket_bytes=1 << 14)
    params = list(src.parameters())
    for b, idx in enumerate(make_buckets(sig, 1 << 14)):
        receiver.load_bucket(b, flatten([params[i] for i in idx]))
    engine.update_weights(4)
    ps, sp = prompts(tok, MIXED), SamplingParams(max_new_tokens=6, top_k=1)
    got, want = (e.generate(ps, sp, pad_id=tok.pad_token_id, eos_id=tok.eos_token_id)
                 for e in (engine, HFDecodeEngine(src)))
    assert torch.equal(got.sequences, want.sequences) and got.version == 4 and want.version == 0


def test_cache_bucket_rounds_up_to_whole_buckets():
    from rlhf_dist.rollout.decode import CACHE_BUCKET, cache_bucket

    assert [cache_bucket(n) for n in (1, CACHE_BUCKET, CACHE_BUCKET + 1)] == [CACHE_BUCKET, CACHE_BUCKET, 2 * CACHE_BUCKET]


def test_chunks_sorted_by_length_come_back_in_prompt_order(tiny):
    """gen_batch_size chunks are made of prompts of similar length; rows and sample_ids return in prompt
    order, each greedy row the same as decoding all prompts at once."""
    from rlhf_dist.rollout.engine import HFDecodeEngine, SamplingParams

    model, tok = load_causal_lm(str(tiny["model"])).eval(), load_tokenizer(str(tiny["model"]))
    ps = prompts(tok, MIXED * 2)
    ids = [100 + i for i in range(len(ps))]
    engine = HFDecodeEngine(model)
    kw = {"pad_id": tok.pad_token_id, "eos_id": tok.eos_token_id, "sample_ids": ids}
    whole, chunked = (engine.generate(ps, SamplingParams(max_new_tokens=6, top_k=1, batch_size=b), **kw)
                      for b in (None, 3))
    assert chunked.sample_ids == ids
    assert torch.equal(chunked.sequences, whole.sequences)
    torch.testing.assert_close(chunked.rollout_logprobs, whole.rollout_logprobs, atol=1e-5, rtol=0)
