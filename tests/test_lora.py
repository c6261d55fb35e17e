"""LoRA (lora_rank > 0): which parameters train, the merged weights the rollout and the saves get, the
reference as the base model with the adapters off, and SFT then PPO end to end with LoRA."""

import json
import shutil

import pytest
import torch
from conftest import base_config, iteration_rows
from safetensors.torch import load_file

from rlhf_dist.config import ConfigError, load_config
from rlhf_dist.config.schema import LORA_TARGETS
from rlhf_dist.models.load import (
    adapters_off,
    apply_lora,
    load_causal_lm,
    load_scalar_model,
    merged_weights,
    save_hf,
    sequence_scores,
)
from rlhf_dist.roles.weight_sync import WeightReceiver, WeightSender, param_signature
from rlhf_dist.rollout.engine import HFDecodeEngine
from rlhf_dist.steps.forwards import response_logprobs

RANK, ALPHA = 4, 8.0


def _lora_lm(tiny, seed=0):
    """The tiny causal LM with adapters whose B is random (PEFT starts it at zero: a no-op adapter)."""
    model = apply_lora(load_causal_lm(str(tiny["model"])), RANK, ALPHA, 0.0, LORA_TARGETS)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


def _ids(n=3, t=12):
    return torch.randint(3, 100, (n, t), generator=torch.Generator().manual_seed(1)), torch.ones(n, t, dtype=torch.long)


def test_only_adapters_and_score_train(tiny):
    lm = apply_lora(load_causal_lm(str(tiny["model"])), RANK, ALPHA, 0.0, LORA_TARGETS)
    trained = [n for n, p in lm.named_parameters() if p.requires_grad]
    assert trained and all(".lora_A." in n or ".lora_B." in n for n in trained)
    assert sum(".lora_A." in n for n in trained) == 2 * len(LORA_TARGETS)  # 2 layers x 7 projections
    rm = apply_lora(load_scalar_model(str(tiny["model"]), pad_token_id=0), RANK, ALPHA, 0.0, "all-linear", ["score"])
    trained = [n for n, p in rm.named_parameters() if p.requires_grad]
    assert "base_model.model.score.modules_to_save.default.weight" in trained
    assert all(".lora_" in n or ".modules_to_save." in n for n in trained)
    assert not any(n.endswith("embed_tokens.weight") or "layernorm" in n for n in trained)


def test_merged_weight_is_base_plus_scaled_ba(tiny):
    model = _lora_lm(tiny)
    plain = load_causal_lm(str(tiny["model"]))
    merged = dict(merged_weights(model))
    q = model.get_base_model().model.layers[0].self_attn.q_proj
    A, B = q.lora_A["default"].weight, q.lora_B["default"].weight  # (r, in), (out, r)
    W = plain.model.layers[0].self_attn.q_proj.weight
    torch.testing.assert_close(merged["model.layers.0.self_attn.q_proj.weight"], W + B @ A * ALPHA / RANK)
    assert not torch.equal(merged["model.layers.0.self_attn.q_proj.weight"], W)
    torch.testing.assert_close(merged["model.embed_tokens.weight"], plain.model.embed_tokens.weight)  # not adapted


def test_merged_names_match_the_base_model(tiny):
    model = _lora_lm(tiny)
    plain = load_causal_lm(str(tiny["model"]))
    want = param_signature(plain.named_parameters())
    assert param_signature(merged_weights(model)) == want
    assert param_signature(merged_weights(model, merge=False)) == want
    rm = apply_lora(load_scalar_model(str(tiny["model"]), pad_token_id=0), RANK, ALPHA, 0.0, LORA_TARGETS, ["score"])
    assert [n for n, _ in merged_weights(rm)] == [n for n, _ in load_scalar_model(str(tiny["model"])).named_parameters()]


def test_weight_sync_of_merged_weights_gives_the_lora_model(tiny):
    """The learner's sender fed by merged_weights, into a plain model through the receiver's signature
    check: the plain model then computes what the LoRA model computes."""
    model = _lora_lm(tiny)
    plain = load_causal_lm(str(tiny["model"])).eval()
    sender = WeightSender(merged_weights(model, merge=False), 0, False, bucket_bytes=1 << 14,
                          tensors=lambda: (t for _, t in merged_weights(model)))
    sig = param_signature(merged_weights(model, merge=False))
    engine = HFDecodeEngine(plain)
    engine.check_signature(sig, "test")
    receiver = WeightReceiver(sig, engine.load_bucket, bucket_bytes=1 << 14)
    assert len(sender.buckets) > 1
    sender.send(lambda b, flat: receiver.load_bucket(b, flat), None)
    ids, attn = _ids()
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-5, rtol=1e-5)


def test_adapters_off_gives_the_base_logprobs(tiny):
    model = _lora_lm(tiny)
    plain = load_causal_lm(str(tiny["model"])).eval()
    ids, attn = _ids()
    with torch.no_grad():
        base = response_logprobs(plain, ids, attn, 4)
        with adapters_off(model):
            off = response_logprobs(model, ids, attn, 4)
        on = response_logprobs(model, ids, attn, 4)
    torch.testing.assert_close(off, base)
    assert (on - base).abs().max() > 1e-2  # the adapters do change the policy


def test_saved_merged_models_load_as_plain_hf(tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    model = _lora_lm(tiny)
    save_hf(model, None, tmp_path / "lm")
    assert not (tmp_path / "lm" / "adapter_config.json").exists()
    ids, attn = _ids()
    with torch.no_grad():
        torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(tmp_path / "lm")(input_ids=ids).logits,
                                   model(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
    rm = apply_lora(load_scalar_model(str(tiny["model"]), pad_token_id=0), RANK, ALPHA, 0.0, LORA_TARGETS, ["score"])
    with torch.no_grad():
        for n, p in rm.named_parameters():
            if p.requires_grad:
                p.add_(0.1)
    save_hf(rm, None, tmp_path / "rm")
    with torch.no_grad():
        torch.testing.assert_close(sequence_scores(load_scalar_model(str(tmp_path / "rm")), ids, attn),
                                   sequence_scores(rm, ids, attn))


def test_dpo_reference_is_the_base_model(tiny):
    """DPO's one-off reference pass over a LoRA model runs with the adapters off: the base's log-probs."""
    from rlhf_dist.data.encode import tokenize_preferences
    from rlhf_dist.data.read import read_dataset
    from rlhf_dist.models.load import load_tokenizer
    from rlhf_dist.steps.dpo import attach_reference

    tok = load_tokenizer(str(tiny["model"]))
    rows, stats = read_dataset(tiny["prefs"], "preference")
    items = tokenize_preferences(tok, rows[:4], 64, False, stats)
    with torch.no_grad():
        lora = attach_reference(_lora_lm(tiny), lambda b: b, items, tok.pad_token_id, micro=2)
        base = attach_reference(load_causal_lm(str(tiny["model"])).eval(), lambda b: b, items, tok.pad_token_id, 2)
    assert [p.ref_chosen for p in lora] == pytest.approx([p.ref_chosen for p in base], abs=1e-5)
    assert [p.ref_rejected for p in lora] == pytest.approx([p.ref_rejected for p in base], abs=1e-5)


def test_lora_config_errors():
    with pytest.raises(ConfigError, match="zero_stage: 3 is not supported with lora_rank 8"):
        load_config({"model_name": "x", "lora_rank": 8, "zero_stage": 3})
    with pytest.raises(ConfigError, match="lora_alpha: only used with lora_rank > 0"):
        load_config({"model_name": "x", "lora_alpha": 32.0})
    with pytest.raises(ConfigError, match="freeze_reward_backbone"):
        load_config({"model_name": "x", "lora_rank": 8, "freeze_reward_backbone": True})
    assert load_config({"model_name": "x", "lora_rank": 8, "lora_target_modules": "all-linear"}).lora_rank == 8


# ---------------------------------------------------------------------------------------
# End to end (Ray, DeepSpeed): SFT with LoRA, then PPO with LoRA, then a resume
# ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lora_run(tiny, tmp_path_factory, local_ray):
    from rlhf_dist.pipeline import create_rlhf_pipeline

    save = tmp_path_factory.mktemp("lora") / "run"
    cfg = base_config(tiny, save, sft_epochs=2, lora_rank=8, ppo_iterations=2, save_interval=1,
                      ppo_recompute_old_logprobs=True, ppo_lr_policy=2e-3, reward_fn="rlhf_dist.demo:positivity_reward",
                      reward_model_weight=0.0)
    pipe = create_rlhf_pipeline(cfg)
    pipe.run_sft()
    pipe.run_ppo_training()
    return save, cfg


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_lora_sft_then_ppo(tiny, lora_run):
    from transformers import AutoModelForCausalLM

    from rlhf_dist.io.tracking import read_metrics

    save, cfg = lora_run
    base = load_file(tiny["model"] / "model.safetensors")
    sft = load_file(save / "sft" / "best_model" / "model.safetensors")  # merged: a plain HF model
    assert sft.keys() == base.keys() and not (save / "sft" / "best_model" / "adapter_config.json").exists()
    assert not torch.equal(sft["model.layers.0.self_attn.q_proj.weight"], base["model.layers.0.self_attn.q_proj.weight"])
    torch.testing.assert_close(sft["model.embed_tokens.weight"], base["model.embed_tokens.weight"])  # frozen
    rows = iteration_rows(save)
    assert len(rows) == 2 and all(r["rollout_logprob_diff"] < 1e-3 for r in rows)  # the merged sync is right
    summary = [r for r in read_metrics(save / "ppo" / "metrics.jsonl") if r.get("summary")][-1]
    assert "reference-0" not in summary["peak_memory_mb"] and "policy-0" in summary["peak_memory_mb"]
    it = save / "ppo" / "iteration_000002"
    for kind in ("policy", "critic"):
        assert {"adapter_model.safetensors", "adapter_config.json"} <= {p.name for p in (it / kind).iterdir()}
        assert not (it / kind / "model.safetensors").exists()
    final = save / "ppo" / "final_model"
    assert (final / "adapter" / "adapter_config.json").is_file() and (final / "critic" / "adapter").is_dir()
    AutoModelForCausalLM.from_pretrained(final)
    ppo = load_file(final / "model.safetensors")
    assert ppo.keys() == sft.keys()
    assert not torch.equal(ppo["model.layers.0.self_attn.q_proj.weight"], sft["model.layers.0.self_attn.q_proj.weight"])
    torch.testing.assert_close(ppo["lm_head.weight"], sft["lm_head.weight"])  # not a target: the base's
    # eval reads an iteration's adapter onto the policy's start: the last iteration is the final model
    from rlhf_dist.evaluation.evaluate import evaluate_model
    from rlhf_dist.models.load import load_causal_lm_or_adapter

    last = load_causal_lm_or_adapter(str(it / "policy"), False, str(save / "sft" / "best_model")).state_dict()
    torch.testing.assert_close(last, ppo)
    res = evaluate_model(load_config(cfg), {"it2": str(it), "final": str(final)}, num_prompts=4)
    assert res["checkpoints"]["it2"]["kl_ref"] == pytest.approx(res["checkpoints"]["final"]["kl_ref"], abs=1e-4)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_lora_ppo_resumes_with_the_adapters(lora_run, tmp_path):
    """One more iteration from iteration_000002 of a copy of the run: the learners load its adapters
    (the policy starts away from the reference: KL > 0) and the rollout gets their merged weights."""
    from rlhf_dist.online.driver import run_ppo

    save, cfg = lora_run
    copy = tmp_path / "run"
    shutil.copytree(save, copy, ignore=shutil.ignore_patterns("final_model", "ray_train", "logs"))
    run_ppo(load_config({**cfg, "save_dir": str(copy), "ppo_iterations": 3}), "cpu")
    rows = iteration_rows(copy)
    assert [r["iteration"] for r in rows] == [1, 2, 3]
    assert rows[2]["rollout_logprob_diff"] < 1e-3 and rows[2]["kl"] > 1e-4
    state = json.loads((copy / "ppo" / "iteration_000003" / "state.json").read_text())
    assert state["version"] == 3


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_lora_reward_and_dpo_stages(tiny, lora_run, tmp_path):
    """The reward model and DPO with LoRA, from the LoRA SFT model: plain HF best models in which only the
    adapted projections (and the reward model's score head) moved, and the stages' metrics moved."""
    import math

    from rlhf_dist.io.tracking import read_metrics
    from rlhf_dist.pipeline import create_rlhf_pipeline

    save, cfg = lora_run
    copy = tmp_path / "run"
    shutil.copytree(save / "sft", copy / "sft")
    pipe = create_rlhf_pipeline({**cfg, "save_dir": str(copy), "reward_epochs": 2, "dpo_batch_size": 32,
                                 "dpo_lr": 2e-3})
    sft = load_file(copy / "sft" / "best_model" / "model.safetensors")
    rm = load_file(pipe.run_reward_training() / "model.safetensors")
    dpo = load_file(pipe.run_dpo() / "model.safetensors")
    q, emb = "model.layers.0.self_attn.q_proj.weight", "model.embed_tokens.weight"
    for out in (rm, dpo):
        assert not torch.equal(out[q], sft[q])
        torch.testing.assert_close(out[emb], sft[emb])
    assert "score.weight" in rm and "lm_head.weight" not in rm
    evals = [r["eval_accuracy"] for r in read_metrics(copy / "reward_model" / "metrics.jsonl") if "eval_accuracy" in r]
    assert evals[-1] > evals[0], evals
    steps = [r for r in read_metrics(copy / "dpo" / "metrics.jsonl") if "loss" in r]
    assert steps[0]["loss"] == pytest.approx(math.log(2.0), abs=1e-3)  # starts at its reference, the base
    assert steps[-1]["reward_margin"] > steps[0]["reward_margin"]
