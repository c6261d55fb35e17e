"""Forwards and generation in chunks (ppo_forward_micro_batch_size, gen_batch_size), in one process (no Ray)."""

import pytest
import torch

from rlhf_dist.config import field_docs, load_config
from rlhf_dist.data.encode import encode_prompt, encode_prompt_response, pad_right
from rlhf_dist.models.load import backbone, load_causal_lm, load_scalar_model, load_tokenizer, sequence_scores
from rlhf_dist.rewards.base import RewardBatch
from rlhf_dist.rewards.model import RewardModelSource
from rlhf_dist.roles.actors import ReferenceWorker, RolloutWorker
from rlhf_dist.roles.learner import Learner
from rlhf_dist.rollout.decode import generate, generate_chunked
from rlhf_dist.rollout.engine import HFDecodeEngine, SamplingParams
from rlhf_dist.steps.forwards import forward_micro_batch, in_chunks, response_logprobs, response_values

TEXTS = ["Hi", "Describe the cat.", "What do you think of this movie? Tell me more.", "Park?", "Tell me about rain.",
         "Good", "How was the city at night, and the food?"]


@pytest.fixture(scope="module")
def models(tiny):
    tok = load_tokenizer(str(tiny["model"]))
    torch.manual_seed(0)  # the scalar head is new
    lm = load_causal_lm(str(tiny["model"])).eval()
    scalar = load_scalar_model(str(tiny["model"]), False, tok.pad_token_id).eval()
    return lm, scalar, tok


@pytest.fixture(scope="module")
def samples(models):
    """Ten sampled rollouts of varied prompt and response lengths."""
    lm, _, tok = models
    ps = [encode_prompt(tok, [{"role": "user", "content": t}]) for t in (TEXTS + TEXTS)[:10]]
    return generate(lm, ps, pad_id=tok.pad_token_id, eos_id=tok.eos_token_id, max_new_tokens=10,
                    generator=torch.Generator().manual_seed(0))


def cfg(**kw):
    return load_config({"model_name": "x", "device": "cpu", "gen_max_new_tokens": 10, **kw})


def bare(cls, config, **attrs):
    """A worker object without RoleWorker.__init__ (no Ray, no logging or thread setup): its methods only."""
    w = object.__new__(cls)
    w.cfg, w.device, w.version = config, torch.device("cpu"), 0
    w.__dict__.update(attrs)
    return w


def batch_sizes(model):
    """Record the batch size of every forward through `model`'s backbone (a scalar model's root passes it the
    input ids by position)."""
    seen = []
    backbone(model).register_forward_pre_hook(
        lambda m, args, kwargs: seen.append((args[0] if args else kwargs["input_ids"]).shape[0]), with_kwargs=True)
    return seen


def clear_hooks(model):
    backbone(model)._forward_pre_hooks.clear()


def test_forward_micro_batch_defaults_to_the_learners_micro_batch():
    assert forward_micro_batch(cfg(ppo_batch_size=16, ppo_mini_batch_size=8)) == 8
    assert forward_micro_batch(cfg(ppo_mini_batch_size=8, roles={"policy": {"num_workers": 2}})) == 4
    assert forward_micro_batch(cfg(ppo_mini_batch_size=8, ppo_micro_batch_size=2)) == 2
    assert forward_micro_batch(cfg(ppo_mini_batch_size=8, ppo_forward_micro_batch_size=3)) == 3
    assert cfg().gen_batch_size is None


def test_new_fields_are_documented():
    docs = {name: (default, doc) for name, _, default, doc in field_docs()}
    for name in ("ppo_forward_micro_batch_size", "gen_batch_size"):
        default, doc = docs[name]
        assert default == "null"
        assert any(w in doc for w in ("default =", "Unset =")), doc  # says what unset means


def test_chunks_equal_one_pass(models, samples):
    """Reference logprobs, critic values and reward scores: chunks of 3 (10 rows: a ragged last chunk)."""
    lm, scalar, _ = models
    seq, attn, P = samples.sequences, samples.attention_mask, samples.prompt_len  # (B, P+R)
    with torch.no_grad():
        for fn in (lambda s, a: response_logprobs(lm, s, a, P),  # (b, R)
                   lambda s, a: response_values(scalar, s, a, P),  # (b, R)
                   lambda s, a: sequence_scores(scalar, s, a)):  # (b,)
            torch.testing.assert_close(in_chunks(fn, 3, seq, attn), fn(seq, attn), atol=1e-5, rtol=1e-5)


def test_reference_worker_forwards_in_micro_batches(models, samples):
    lm, _, _ = models
    seen = batch_sizes(lm)
    try:
        chunked = bare(ReferenceWorker, cfg(ppo_forward_micro_batch_size=3), model=lm).logprobs(samples)  # (B, R)
    finally:
        clear_hooks(lm)
    assert seen == [3, 3, 3, 1]
    with torch.no_grad():
        whole = response_logprobs(lm, samples.sequences, samples.attention_mask, samples.prompt_len)
    torch.testing.assert_close(chunked, whole, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("same_tokens", [True, False])
def test_reward_model_source_scores_in_micro_batches(models, samples, same_tokens):
    """Also the re-tokenising path (a reward model with another tokenizer): chunked after re-tokenising."""
    _, scalar, tok = models
    prompts = [[{"role": "user", "content": t}] for t in (TEXTS + TEXTS)[:10]]
    src = bare(RewardModelSource, cfg(ppo_forward_micro_batch_size=4), model=scalar, tok=tok, same_tokens=same_tokens)
    responses = [tok.decode(r[m.bool()], skip_special_tokens=True)
                 for r, m in zip(samples.responses, samples.action_mask)]
    seen = batch_sizes(scalar)
    try:
        out = src.score(RewardBatch(prompts, responses, list(samples.sample_ids), [{}] * len(prompts),
                                    samples.sequences, samples.attention_mask))
    finally:
        clear_hooks(scalar)
    assert seen == [4, 4, 2]
    if same_tokens:
        ids, attn = samples.sequences, samples.attention_mask
    else:
        ids, attn = pad_right([encode_prompt_response(tok, p, r).input_ids
                               for p, r in zip(prompts, responses)], tok.pad_token_id)
    with torch.no_grad():
        torch.testing.assert_close(out.scores, sequence_scores(scalar, ids, attn), atol=1e-5, rtol=1e-5)
    assert (out.outcomes == 0).all()


class _Engine:
    """What Learner.forward uses of a DeepSpeed engine."""

    def __init__(self, module):
        self.module, self.device = module, torch.device("cpu")

    def eval(self):
        self.module.eval()

    def train(self):
        self.module.train()


@pytest.mark.parametrize("kind", ["policy", "critic"])
def test_learner_experience_forward_in_micro_batches(models, samples, kind):
    lm, scalar, _ = models
    module = lm if kind == "policy" else scalar
    w = bare(Learner, cfg(ppo_forward_micro_batch_size=6), kind=kind, engine=_Engine(module))
    seen = batch_sizes(module)
    try:
        out = w.forward(samples)  # (B, R)
    finally:
        clear_hooks(module)
        module.eval()
    assert seen == [6, 4]
    s, a, P = samples.sequences, samples.attention_mask, samples.prompt_len
    with torch.no_grad():
        whole = response_logprobs(lm, s, a, P) if kind == "policy" else response_values(scalar, s, a, P)
    torch.testing.assert_close(out, whole, atol=1e-5, rtol=1e-5)


def test_chunked_generation_keeps_count_order_and_seed(models):
    lm, _, tok = models
    ps = [encode_prompt(tok, [{"role": "user", "content": t}]) for t in TEXTS]
    ids = [40, 3, 17, 9, 0, 21, 5]
    c = cfg(gen_batch_size=3)
    w = bare(RolloutWorker, c, rank=0, engine=HFDecodeEngine(lm), sampling=SamplingParams.from_config(c),
             generator=torch.Generator())
    a = w.generate(ps, ids, seed=7, pad_id=tok.pad_token_id, eos_id=tok.eos_token_id)
    b = w.generate(ps, ids, seed=7, pad_id=tok.pad_token_id, eos_id=tok.eos_token_id)
    assert len(a) == 7 and a.sample_ids == ids
    assert torch.equal(a.sequences, b.sequences)  # one generator, seeded once per call: reproducible
    # Each row is its own prompt, re-padded into the merged batch.
    for row, p in zip(a.sequences[:, :a.prompt_len], ps):
        assert row[a.prompt_len - len(p):].tolist() == p
    with torch.no_grad():
        lp = response_logprobs(lm, a.sequences, a.attention_mask, a.prompt_len)
    assert ((lp - a.rollout_logprobs).abs() * a.action_mask).max() < 1e-4


def test_greedy_chunked_generation_equals_unchunked(models):
    lm, _, tok = models
    ps = [encode_prompt(tok, [{"role": "user", "content": t}]) for t in TEXTS]
    kw = dict(pad_id=tok.pad_token_id, eos_id=tok.eos_token_id, max_new_tokens=8, top_k=1)  # top_k=1: greedy
    whole = generate_chunked(lm, ps, None, **kw)
    chunked = generate_chunked(lm, ps, 2, **kw)
    assert chunked.sample_ids == whole.sample_ids == list(range(7))
    assert torch.equal(chunked.sequences, whole.sequences)
    assert torch.equal(chunked.action_mask, whole.action_mask)
    torch.testing.assert_close(chunked.rollout_logprobs, whole.rollout_logprobs, atol=1e-5, rtol=1e-5)


def test_summary_after_the_final_model_is_best_effort(tmp_path, caplog):
    """The peak-memory summary runs after final_model is written; its failure is logged, not raised."""
    import time
    from types import SimpleNamespace

    from rlhf_dist.io.tracking import MetricsWriter
    from rlhf_dist.online.driver import PPORun
    from rlhf_dist.roles.placement import ROLES
    from rlhf_dist.runtime.errors import RoleFailure

    def dead(refs, role, phase):
        raise RoleFailure(f"reward: actor died during phase '{phase}'", died=True)

    run = object.__new__(PPORun)
    run.roles, run.t_start, run._wait = SimpleNamespace(**{r: [] for r in ROLES}), time.perf_counter(), dead
    metrics = MetricsWriter(tmp_path / "metrics.jsonl")
    with caplog.at_level("WARNING"):
        run._write_summary(metrics)
    metrics.close()
    assert "no summary row" in caplog.text and "actor died" in caplog.text
    assert (tmp_path / "metrics.jsonl").read_text() == ""
