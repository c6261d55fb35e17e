"""DPO: the loss against hand-worked numbers, the step's normalisation, and the stage end to end as a Ray
Train job (alone, and after SFT through the pipeline's `stages`)."""

import json
import math

import pytest
import torch
from conftest import base_config
from safetensors.torch import load_file

from rlhf_dist.algo import dpo_loss
from rlhf_dist.config import ConfigError, load_config
from rlhf_dist.io.tracking import read_metrics
from rlhf_dist.pipeline import create_rlhf_pipeline

pytestmark = pytest.mark.timeout(900)

# Two pairs. h = (pi_c - ref_c) - (pi_r - ref_r) = [(-1 + 2) - (-3 + 2), (-2 + 2) - (-1 + 2)] = [2, -1].
PI_C, PI_R = torch.tensor([-1.0, -2.0]), torch.tensor([-3.0, -1.0])
REF_C, REF_R = torch.tensor([-2.0, -2.0]), torch.tensor([-2.0, -2.0])


def test_dpo_sigmoid_loss_and_stats_by_hand():
    pi_c = PI_C.clone().requires_grad_()
    losses, st = dpo_loss(pi_c, PI_R, REF_C, REF_R, beta=0.5)
    # -log sigmoid(0.5 * h) = log(1 + exp(-0.5 h)): log(1 + e^-1) and log(1 + e^0.5)
    torch.testing.assert_close(losses, torch.tensor([0.3132617, 0.9740770]))
    # implicit rewards 0.5 * (pi - ref): chosen [0.5, 0], rejected [-0.5, 0.5]
    torch.testing.assert_close(st["reward_chosen"], torch.tensor([0.5, 0.0]))
    torch.testing.assert_close(st["reward_rejected"], torch.tensor([-0.5, 0.5]))
    torch.testing.assert_close(st["reward_margin"], torch.tensor([1.0, -0.5]))
    torch.testing.assert_close(st["reward_accuracy"], torch.tensor([1.0, 0.0]))
    # d/d pi_c of log(1 + exp(-beta h)) = -beta * sigmoid(-beta h): -0.5 * sigmoid(-1), -0.5 * sigmoid(0.5)
    losses.sum().backward()
    torch.testing.assert_close(pi_c.grad, torch.tensor([-0.1344707, -0.3112347]))


def test_dpo_ipo_loss_by_hand():
    # (h - 1 / (2 beta))^2 with beta 0.5: (2 - 1)^2 = 1, (-1 - 1)^2 = 4
    losses, _ = dpo_loss(PI_C, PI_R, REF_C, REF_R, beta=0.5, kind="ipo")
    torch.testing.assert_close(losses, torch.tensor([1.0, 4.0]))
    # a pair at the target margin h = 1 / (2 beta) = 5 (beta 0.1) is not pushed further: loss and gradient 0
    pi_c = torch.tensor([3.0], requires_grad=True)
    loss, _ = dpo_loss(pi_c, torch.tensor([-2.0]), torch.tensor([0.0]), torch.tensor([0.0]), beta=0.1, kind="ipo")
    loss.sum().backward()
    assert loss.item() == 0.0 and pi_c.grad.item() == 0.0


def test_dpo_loss_at_the_reference_and_unknown_kind():
    same = torch.tensor([-4.0, -7.0])
    losses, st = dpo_loss(same, same, same, same, beta=0.1)  # the policy is the reference: h = 0
    torch.testing.assert_close(losses, torch.full((2,), math.log(2.0)))
    assert st["reward_accuracy"].sum() == 0  # a tie is not a correct ranking
    with pytest.raises(ValueError, match="unknown DPO loss 'hinge'"):
        dpo_loss(same, same, same, same, beta=0.1, kind="hinge")


def _pairs(tiny, n):
    from rlhf_dist.data.encode import tokenize_preferences
    from rlhf_dist.data.read import read_dataset
    from rlhf_dist.models.load import load_tokenizer

    tok = load_tokenizer(str(tiny["model"]))
    rows, stats = read_dataset(tiny["prefs"], "preference")
    return tok, tokenize_preferences(tok, rows[:n], 64, False, stats)


def test_step_sums_response_logprobs_and_splits_like_one_batch(tiny):
    """Sequence log-probs sum the response tokens only; at the starting weights every pair costs log 2; and
    two micro-batches normalised by the step's pair count give the loss and gradient of one batch."""
    from rlhf_dist.algo import logprobs_from_logits
    from rlhf_dist.models.load import load_causal_lm
    from rlhf_dist.steps.dpo import attach_reference, dpo_batch, dpo_step_loss, sequence_logprobs

    tok, items = _pairs(tiny, 4)
    model = load_causal_lm(str(tiny["model"]))
    same = lambda b: b
    pairs = attach_reference(model, same, items, tok.pad_token_id, micro=3)  # chunks of 3 and 1: padding differs
    c = items[0][0]
    ids = torch.tensor([c.input_ids])  # (1, T)
    lp = logprobs_from_logits(model(input_ids=ids).logits[:, :-1], ids[:, 1:])[0]  # (T-1,)
    by_hand = sum(lp[t - 1].item() for t in range(c.prompt_len, len(c.input_ids)) if c.loss_mask[t])
    assert c.prompt_len > 0 and sum(c.loss_mask[:c.prompt_len]) == 0
    assert pairs[0].ref_chosen == pytest.approx(by_hand, abs=1e-4)
    whole = sequence_logprobs(model, dpo_batch(pairs, tok.pad_token_id))  # (8,)
    torch.testing.assert_close(whole[:4], torch.tensor([p.ref_chosen for p in pairs]), atol=1e-4, rtol=0)
    packed = attach_reference(model, same, items, tok.pad_token_id, micro=3, max_tokens=60)  # dpo_max_tokens_...
    for a, b in zip(packed, pairs):  # the reference pass packed: the same values, in the same order
        assert (a.ref_chosen, a.ref_rejected) == pytest.approx((b.ref_chosen, b.ref_rejected), abs=1e-4)

    def grads(chunks):
        model.zero_grad()
        total = 0.0
        for chunk in chunks:
            loss, st = dpo_step_loss(model, dpo_batch(chunk, tok.pad_token_id), norm=4, beta=0.1, kind="sigmoid")
            loss.backward()
            total += loss.item()
        return total, [p.grad.clone() for p in model.parameters()]

    one, g1 = grads([pairs])
    two, g2 = grads([pairs[:2], pairs[2:]])
    assert one == pytest.approx(math.log(2.0), abs=1e-4)  # the mean pair loss at h = 0
    assert two == pytest.approx(one, abs=1e-6)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


def test_stages_field_validation():
    base = {"model_name": "m"}
    assert load_config(base).run_stages() == ("sft", "reward", "ppo")
    assert load_config({**base, "reward_model_weight": 0, "reward_fn": "m:f"}).run_stages() == ("sft", "ppo")
    assert load_config({**base, "stages": ["sft", "dpo"]}).run_stages() == ("sft", "dpo")
    assert load_config({**base, "stages": ["dpo"]}).run_stages() == ("dpo",)
    assert load_config({**base, "stages": ["sft", "ppo"], "reward_model_weight": 0,
                        "reward_fn": "m:f"}).run_stages() == ("sft", "ppo")
    assert load_config({**base, "stages": ["sft", "dpo", "reward", "ppo"]}).stages == ["sft", "dpo", "reward", "ppo"]
    for stages, message in ((["sft", "ppo"], "stages: ppo scores with the reward model"),
                            (["sft", "ppo", "reward"], "reward must come before ppo"),
                            (["dpo", "sft"], "stages: sft must come first"),
                            (["sft", "dpo", "dpo"], "stages: dpo listed more than once"),
                            ([], "stages: must not be empty"),
                            (["sft", "orpo"], "stages.1: Invalid enum value 'orpo'")):
        with pytest.raises(ConfigError, match=message):
            load_config({**base, "stages": stages})
    with pytest.raises(ConfigError, match=r"dpo_batch_size: 16 is not a multiple of dpo_micro_batch_size \(3\)"):
        load_config({**base, "dpo_micro_batch_size": 3})
    with pytest.raises(ConfigError, match="dpo_loss"):
        load_config({**base, "dpo_loss": "hinge"})


def test_placement_checks_dpo_workers():
    from rlhf_dist.roles.placement import placement_problems

    cfg = load_config({"model_name": "m", "dpo_workers": 4, "dpo_batch_size": 16, "train_gpus_per_worker": 0.5})
    errors = placement_problems(cfg, ("sft", "dpo"), "cpu", {"n": {"CPU": 2.0}}).errors
    assert len(errors) == 1 and errors[0].startswith("dpo stage: 4 Ray Train worker(s)") and "dpo_workers" in errors[0]
    nccl = placement_problems(cfg, ("dpo",), "cuda", {"n": {"CPU": 8.0, "GPU": 4.0}}).errors
    assert nccl and nccl[0].startswith("dpo stage: dpo_workers 4 at train_gpus_per_worker 0.5")


def _subset(src, dst, n):
    dst.write_text("".join(src.read_text().splitlines(keepends=True)[:n]))
    return str(dst)


def dpo_config(tiny, tmp_path, **extra):
    prefs = _subset(tiny["prefs"], tmp_path / "dpo.jsonl", 320)  # 288 train, 32 held out
    dpo = dict(dpo_data_path=prefs, dpo_epochs=2, dpo_batch_size=32, dpo_lr=1e-3, dpo_beta=0.1)
    return base_config(tiny, tmp_path / "run", **{**dpo, **extra})


@pytest.mark.slow
def test_dpo_trains_and_writes_layout(tiny, tmp_path, local_ray):
    from transformers import AutoModelForCausalLM

    save = tmp_path / "run"
    out = create_rlhf_pipeline(dpo_config(tiny, tmp_path)).run_dpo()  # no SFT checkpoint: from model_name
    assert out == save / "dpo" / "best_model"
    assert json.loads((save / "dpo" / "stage_complete.json").read_text())["stage"] == "dpo"
    AutoModelForCausalLM.from_pretrained(out)
    before, after = load_file(tiny["model"] / "model.safetensors"), load_file(out / "model.safetensors")
    assert all(not torch.equal(before[k], after[k]) for k in before)  # every parameter changed
    rows = read_metrics(save / "dpo" / "metrics.jsonl")
    steps = [r for r in rows if "loss" in r]
    assert len(steps) == 2 * (288 // 32)
    for key in ("accuracy", "reward_margin", "logp_chosen", "logp_rejected"):
        assert all(math.isfinite(r[key]) for r in steps), key
    first, last = steps[0], steps[-1]
    assert first["loss"] == pytest.approx(math.log(2.0), abs=1e-3)  # the policy starts as the reference
    # at h = 0 a pair counts as correct only by rounding noise; after two epochs every train pair is ranked right
    assert last["loss"] < 0.6 * first["loss"] and first["accuracy"] < 0.75 and last["accuracy"] >= 0.95
    assert last["reward_margin"] > first["reward_margin"]
    evals = [r for r in rows if "eval_accuracy" in r]
    assert len(evals) == 3 and evals[-1]["eval_accuracy"] >= 0.9  # before training and after each epoch
    assert {"eval_loss", "eval_reward_margin", "eval_logp_chosen", "eval_logp_rejected"} <= set(evals[-1])
    log = (save / "logs" / "run.log").read_text()
    assert "dpo: starting from" in log and "model_name (no SFT checkpoint" in log


@pytest.mark.slow
def test_stages_sft_then_dpo(tiny, tmp_path, local_ray):
    """`stages: [sft, dpo]` runs SFT then DPO from SFT's model; a rerun skips both."""
    sft = _subset(tiny["sft"], tmp_path / "sft.jsonl", 320)
    cfg = dpo_config(tiny, tmp_path, stages=["sft", "dpo"], sft_data_path=sft, dpo_epochs=1)
    out = create_rlhf_pipeline(cfg).run_full_pipeline()
    save = tmp_path / "run"
    assert out == {"sft": save / "sft" / "best_model", "dpo": save / "dpo" / "best_model"}
    assert not (save / "reward_model").exists() and not (save / "ppo").exists()
    assert "dpo: starting from %s (the SFT checkpoint)" % (save / "sft" / "best_model") in (
        save / "logs" / "run.log").read_text()
    mtime = (save / "dpo" / "stage_complete.json").stat().st_mtime
    assert create_rlhf_pipeline(cfg).run_full_pipeline() == out
    assert (save / "dpo" / "stage_complete.json").stat().st_mtime == mtime
