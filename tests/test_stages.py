"""SFT and reward stages, end to end as Ray Train jobs with DeepSpeed on CPU."""

import json

import pytest
import torch
from conftest import base_config
from safetensors.torch import load_file

from rlhf_dist.io.tracking import read_metrics
from rlhf_dist.pipeline import create_rlhf_pipeline

pytestmark = pytest.mark.timeout(900)


def losses(save_dir, stage="sft"):
    sub = "sft" if stage == "sft" else "reward_model"
    return [r["loss"] for r in read_metrics(save_dir / sub / "metrics.jsonl") if "loss" in r]


@pytest.mark.slow
def test_sft_trains_and_writes_layout(tiny, tmp_path, local_ray):
    from transformers import AutoModelForCausalLM

    save = tmp_path / "run"
    out = create_rlhf_pipeline(base_config(tiny, save, sft_epochs=2)).run_sft()
    assert out == save / "sft" / "best_model"
    curve = losses(save)
    assert curve[-1] < 0.7 * curve[0]
    before = load_file(tiny["model"] / "model.safetensors")
    after = load_file(out / "model.safetensors")
    assert all(not torch.equal(before[k], after[k]) for k in before)  # every parameter changed
    AutoModelForCausalLM.from_pretrained(out)
    assert (out / "tokenizer.json").is_file() and (out / "generation_config.json").is_file()
    snap = json.loads((save / "config.json").read_text())
    assert snap["sft_epochs"] == 2
    assert (save / "logs" / "run.log").stat().st_size > 0


@pytest.mark.slow
def test_sft_one_vs_two_workers_and_accumulation(tiny, tmp_path, local_ray):
    """The same global batch gives the same loss curve on 1 or 2 workers, with or without accumulation,
    packed (2 workers, micro-batches of at most 50 tokens: their count differs per step and per rank until
    the ranks agree on one), and under ZeRO-3 with accumulation."""
    common = dict(sft_batch_size=8, sft_lr=1e-3, train_cpus_per_worker=1, eval_fraction=0.9)
    runs = {
        "1w_micro8": dict(sft_workers=1, sft_micro_batch_size=8),
        "1w_accum2": dict(sft_workers=1, sft_micro_batch_size=4),
        "2w_micro4": dict(sft_workers=2, sft_micro_batch_size=4),
        "2w_packed": dict(sft_workers=2, sft_max_tokens_per_micro_batch=50),
        "2w_zero3_accum2": dict(sft_workers=2, sft_micro_batch_size=2, zero_stage=3),
    }
    curves, evals = {}, {}
    for name, extra in runs.items():
        save = tmp_path / name
        create_rlhf_pipeline(base_config(tiny, save, **common, **extra)).run_sft()
        curves[name] = losses(save)
        evals[name] = [r["eval_loss"] for r in read_metrics(save / "sft" / "metrics.jsonl") if "eval_loss" in r]
    ref = curves["1w_micro8"]
    assert len(ref) >= 10 and len(evals["1w_micro8"]) == 2  # before training and after the epoch
    for name, c in curves.items():
        assert c == pytest.approx(ref, rel=2e-3, abs=2e-3), name
        assert evals[name] == pytest.approx(evals["1w_micro8"], rel=2e-3), name


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_zero3_eval_with_uneven_shares(tmp_path, local_ray):
    """Under ZeRO-3 a forward gathers each partitioned parameter (here the embedding and the head, over
    DeepSpeed's persistence threshold of 1e5 elements; the `tiny` model has none), a collective every rank
    must join. 21 eval rows split 11/10 over 2 workers, so in micro-batches of 2 one rank has a micro-batch
    more: the other runs a filler forward, whose loss is not counted (without it, the job hangs)."""
    from rlhf_dist.demo.tiny import build_tiny

    wide = build_tiny(tmp_path / "wide", seed=0, hidden_size=256, num_layers=1, intermediate_size=256)
    rows = wide["sft"].read_text().splitlines()[:80]
    data = tmp_path / "sft80.jsonl"
    data.write_text("\n".join(rows) + "\n")
    common = dict(sft_data_path=str(data), eval_fraction=0.2625, sft_batch_size=8, sft_micro_batch_size=2,
                  sft_lr=1e-3, train_cpus_per_worker=1, zero_stage=3)
    curves, evals = {}, {}
    for workers in (2, 1):
        save = tmp_path / f"w{workers}"
        create_rlhf_pipeline(base_config(wide, save, sft_workers=workers, **common)).run_sft()
        rows = read_metrics(save / "sft" / "metrics.jsonl")
        curves[workers] = [r["loss"] for r in rows if "loss" in r]
        evals[workers] = [r["eval_loss"] for r in rows if "eval_loss" in r]
    assert len(curves[1]) == 7 and len(evals[1]) == 2  # 59 train rows in steps of 8; before and after the epoch
    assert curves[2] == pytest.approx(curves[1], rel=2e-3, abs=2e-3)
    assert evals[2] == pytest.approx(evals[1], rel=2e-3)


@pytest.mark.slow
def test_reward_model_accuracy_and_layout(tiny, tmp_path, local_ray):
    from transformers import AutoModelForSequenceClassification

    save = tmp_path / "run"
    pipe = create_rlhf_pipeline(base_config(tiny, save, reward_epochs=2, reward_max_tokens_per_micro_batch=400))
    out = pipe.run_reward_training()  # no SFT checkpoint: starts from model_name and says so
    rows = read_metrics(save / "reward_model" / "metrics.jsonl")
    assert all(r["padding"] == 0 for r in rows if "padding" in r)  # packed into one row each
    final_acc = [r["eval_accuracy"] for r in rows if "eval_accuracy" in r][-1]
    assert final_acc >= 0.9
    rm = AutoModelForSequenceClassification.from_pretrained(out, num_labels=1)
    assert rm.config.num_labels == 1
    assert "model_name (no SFT checkpoint" in (save / "logs" / "run.log").read_text()


@pytest.mark.slow
def test_frozen_backbone_only_moves_the_head(tiny, tmp_path, local_ray):
    from rlhf_dist.models.load import load_scalar_model

    save = tmp_path / "run"
    out = create_rlhf_pipeline(base_config(tiny, save, freeze_reward_backbone=True)).run_reward_training()
    init = load_scalar_model(str(tiny["model"])).state_dict()
    after = load_file(out / "model.safetensors")
    for k, v in after.items():
        if k.startswith("score."):
            assert not torch.equal(v, init[k]), k
        else:
            assert torch.equal(v, init[k]), k


@pytest.mark.parametrize("stage", [0, 3])
def test_engine_steps_like_torch(tiny, stage, gloo_group):
    """A DeepSpeed engine (one rank, fused AdamW) with two accumulated micro-batches takes the step of plain
    torch: the mean gradient, clipped, through AdamW. The loop owns the boundary (one step() after the
    micro-batches, each loss carrying its own 1/2: `accumulate`), and calls the module itself, not the
    engine, as the learners do. Under ZeRO-3 that once lost every micro-batch's gradient but the last."""
    import copy

    import deepspeed

    from rlhf_dist.models.load import load_causal_lm
    from rlhf_dist.runtime.distributed import accumulate, make_engine

    model = load_causal_lm(str(tiny["model"]))
    ref = copy.deepcopy(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = torch.randint(0, model.config.vocab_size, (4, 12), generator=torch.Generator().manual_seed(0))  # (B, T)
    engine = make_engine(model, lr=1e-2, total_steps=1, warmup_steps=0, micro_batch=2, grad_accum=2,
                         zero_stage=stage, grad_clip=0.1, bf16=False, constant_lr=True)
    for i in accumulate(engine, 2):
        half = ids[2 * i:2 * i + 2]
        engine.backward(engine.module(input_ids=half, labels=half, use_cache=False).loss / 2, scale_wrt_gas=False)
    with deepspeed.zero.GatheredParameters(list(model.parameters()), enabled=stage == 3):
        after = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.0)
    for half in (ids[:2], ids[2:]):
        (ref(input_ids=half, labels=half, use_cache=False).loss / 2).backward()
    torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.1)
    opt.step()
    for (name, p), q in zip(after.items(), ref.parameters()):
        # Steps are about lr = 1e-2; AdamW's direction on a near-zero gradient amplifies float noise.
        torch.testing.assert_close(p, q, rtol=1e-3, atol=1e-4, msg=lambda m: f"{name}: {m}")
        if name.endswith("proj.weight"):
            assert not torch.equal(p, before[name]), name
