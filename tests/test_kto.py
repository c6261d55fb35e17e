"""KTO: the loss against hand-worked numbers and its gradient's sign, the data (unpaired rows and pairs, bad
rows naming file:line), the mismatched pairs, micro-batches against one batch through the loop's own step,
and the stage end to end from an SFT model (the desirable rate on held-out prompts rises)."""

import json
import math

import pytest
import torch
from conftest import base_config

from rlhf_dist.algo import kto_loss
from rlhf_dist.config import ConfigError, load_config
from rlhf_dist.data.read import read_dataset
from rlhf_dist.data.rows import DataError

pytestmark = pytest.mark.timeout(900)

# Two rows: r = pi - ref = [1, -1]; the first desirable, the second not; beta 0.5, z0 = 0.4.
PI, REF, DESIRABLE = torch.tensor([-1.0, -3.0]), torch.tensor([-2.0, -2.0]), torch.tensor([True, False])


def test_kto_loss_by_hand():
    losses, st = kto_loss(PI, REF, DESIRABLE, torch.tensor(0.4), beta=0.5, desirable_weight=2.0,
                          undesirable_weight=1.0)
    # desirable: 2 * (1 - sigmoid(0.5 * (1 - 0.4))) = 2 * (1 - sigmoid(0.3)); undesirable: 1 - sigmoid(0.5 * (0.4 + 1))
    torch.testing.assert_close(losses, torch.tensor([0.8511150, 0.3318122]))
    torch.testing.assert_close(st["reward_margin"], torch.tensor([0.3, 0.7]))  # beta * sign * (r - z0)
    torch.testing.assert_close(st["accuracy"], torch.tensor([1.0, 1.0]))
    torch.testing.assert_close(st["kl"], torch.tensor([0.4, 0.4]))
    # A negative KL estimate is clamped: z0 = 0, both rows cost 1 - sigmoid(0.5)
    losses, st = kto_loss(PI, REF, DESIRABLE, torch.tensor(-1.0), beta=0.5)
    torch.testing.assert_close(losses, torch.full((2,), 0.3775407))
    assert st["kl"].sum() == 0
    # At the reference (r = 0, z0 = 0) every row costs its weight / 2 and none is on its label's side.
    losses, st = kto_loss(REF, REF, DESIRABLE, torch.tensor(0.0), beta=0.1, desirable_weight=1.0,
                          undesirable_weight=3.0)
    torch.testing.assert_close(losses, torch.tensor([0.5, 1.5]))
    assert st["accuracy"].sum() == 0


def test_kto_gradient_signs():
    """Descent raises a desirable completion's log-prob and lowers an undesirable one's; no gradient reaches
    the reference point."""
    pi = PI.clone().requires_grad_()
    kl = torch.tensor(0.4, requires_grad=True)
    losses, _ = kto_loss(pi, REF, DESIRABLE, kl, beta=0.5, desirable_weight=2.0, undesirable_weight=1.0)
    losses.sum().backward()
    # d/dpi of 2 (1 - s(0.5 (r - z0))) = -2 * 0.5 * s'(0.3); of 1 - s(0.5 (z0 - r)) = +0.5 * s'(0.7)
    torch.testing.assert_close(pi.grad, torch.tensor([-0.2444583, 0.1108564]))
    assert kl.grad is None


def test_unrelated_rows_pair_other_prompts():
    from rlhf_dist.steps.kto import unrelated_rows

    prompts = ["a", "a", "b", "b", "c", "c", "d"]  # pairs give each prompt twice, side by side
    partner = unrelated_rows(prompts, seed=0)
    assert all(prompts[j] != prompts[i] for i, j in enumerate(partner))
    assert partner == unrelated_rows(prompts, seed=0) != unrelated_rows(prompts, seed=1)  # seeded
    assert all(j != i for i, j in enumerate(unrelated_rows(["same"] * 3, seed=0)))  # one prompt: another row


def test_kto_rows_and_pairs(tmp_path):
    path = tmp_path / "kto.jsonl"
    path.write_text(json.dumps({"prompt": "Hi?", "completion": "Lovely.", "label": True}) + "\n"
                    + json.dumps({"prompt": [{"role": "user", "content": "Hi?"}], "completion": "Awful.",
                                  "label": False}) + "\n"
                    + json.dumps({"prompt": "How?", "chosen": "Good.", "rejected": "Bad."}) + "\n")
    lines, stats = read_dataset(path, "kto")
    rows = [r for line in lines for r in line]
    assert stats.rows == 3 and [(r.completion[0]["content"], r.desirable) for r in rows] == [
        ("Lovely.", True), ("Awful.", False), ("Good.", True), ("Bad.", False)]
    assert rows[2].where == rows[3].where == f"{path.resolve()}:3"
    for row, message in (({"prompt": "p", "completion": "c", "label": "yes"}, "kto.jsonl:2: field 'label' must be "
                                                                              "true or false, got 'yes'"),
                         ({"prompt": "p", "completion": "c"}, "kto.jsonl:2: missing field 'label'"),
                         ({"prompt": "p", "label": True}, "kto.jsonl:2: missing field 'completion'"),
                         ({"prompt": "p", "chosen": "c", "rejected": "c"}, "kto.jsonl:2: 'chosen' and 'rejected' "
                                                                            "are identical")):
        path.write_text(json.dumps({"prompt": "p", "completion": "c", "label": True}) + "\n" + json.dumps(row) + "\n")
        with pytest.raises(DataError, match=message):
            read_dataset(path, "kto")


def test_kto_fields_and_stage():
    cfg = load_config({"model_name": "m", "stages": ["sft", "kto"], "kto_micro_batch_size": 4})
    assert cfg.run_stages() == ("sft", "kto") and cfg.kto_beta == 0.1
    for bad, message in (({"kto_beta": 0}, "kto_beta"), ({"kto_undesirable_weight": -1}, "kto_undesirable_weight"),
                         ({"kto_micro_batch_size": 3}, r"kto_batch_size: 16 is not a multiple of kto_micro_batch")):
        with pytest.raises(ConfigError, match=message):
            load_config({"model_name": "m", **bad})


class _Engine:
    """The DeepSpeed engine's surface that `loop.train_step` uses, over plain torch autograd."""

    def __init__(self, module):
        self.module, self.optimizer = module, None

    def set_gradient_accumulation_boundary(self, last: bool) -> None:
        pass

    def backward(self, loss, scale_wrt_gas: bool) -> None:
        loss.backward()

    def step(self) -> None:
        pass


def _task(tiny, n: int, micro: int, max_tokens=None):
    """A KTO Task on `n` rows of the demo pairs, the reference attached, then its mismatched pairs' reference
    log-probs lowered by row-dependent amounts: z0 > 0, and differing between micro-batches."""
    from dataclasses import replace
    from pathlib import Path

    from rlhf_dist.config import load_config
    from rlhf_dist.models.load import load_causal_lm, load_tokenizer
    from rlhf_dist.offline.kto import task_parts
    from rlhf_dist.offline.task import Task

    cfg = load_config({"model_name": str(tiny["model"]), "kto_data_path": str(tiny["prefs"]), "max_length": 64,
                       "kto_beta": 0.5, "kto_desirable_weight": 1.5})
    tok = load_tokenizer(str(tiny["model"]))
    items, _, parts = task_parts(cfg, tok, str(tiny["model"]), False)
    model = load_causal_lm(str(tiny["model"]))
    items = parts.pop("prepare")(model, lambda b: b, items[:n], micro)
    items = [replace(it, ref_kl=it.ref_kl - 0.5 * i) for i, it in enumerate(items)]
    parts.pop("model")
    return model, Task("kto", Path("."), model, tok, items, [], epochs=1, batch_size=n, micro_batch=micro, lr=1.0,
                       warmup_ratio=0.0, max_tokens=max_tokens, **parts)


@pytest.mark.parametrize("max_tokens", [None, 90])
def test_micro_batches_step_like_one_batch(tiny, max_tokens):
    """Through the loop's own step: micro-batches (padded, or packed by tokens) give the loss, stats and
    gradients of one batch, because the reference point is the whole step's KL estimate, not each
    micro-batch's (whose estimates differ here: the test would fail with them)."""
    from rlhf_dist.offline.loop import step_mean, train_step
    from rlhf_dist.offline.task import micro_batches

    model, task = _task(tiny, 8, 8, max_tokens)

    def step(micro):
        task.micro_batch = micro
        model.zero_grad()
        micros = micro_batches(task, task.train)
        sums, _ = train_step(task, _Engine(model), micros, 8.0, True, lambda b: b)
        return micros, sums, [p.grad.clone() for p in model.parameters()]

    task.max_tokens = None
    one, s1, g1 = step(8)
    task.max_tokens = max_tokens
    micros, s2, g2 = step(2)
    assert len(one) == 1 and len(micros) >= 3
    per_micro = [step_mean(task, model, [m], True, lambda b: b).item() for m in micros]
    whole = step_mean(task, model, one, True, lambda b: b).item()
    assert whole > 0.5 and max(per_micro) - min(per_micro) > 0.5  # z0 of a micro-batch alone would differ
    for k in ("loss_sum", "accuracy", "reward_margin", "kl"):
        assert float(s2[k]) == pytest.approx(float(s1[k]), abs=1e-5), k
    assert float(s1["kl"]) / 8 == pytest.approx(whole, abs=1e-5)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)
    assert math.isfinite(float(s1["loss_sum"]))


def _subset(src, dst, n):
    dst.write_text("".join(src.read_text().splitlines(keepends=True)[:n]))
    return str(dst)


@pytest.mark.slow
def test_kto_raises_the_desirable_rate(tiny, tiny_sft, tmp_path, local_ray):
    """`stages: [sft, kto]` with the SFT model given (policy_model_path: `run` skips sft), on the demo task: KTO
    on the preference pairs split into labelled rows; the share of positive answers on held-out prompts
    (topics never asked in training: eval.jsonl) rises from the SFT model's to KTO's."""
    from rlhf_dist.evaluation.evaluate import evaluate_model
    from rlhf_dist.io.tracking import read_metrics
    from rlhf_dist.pipeline import create_rlhf_pipeline

    save = tmp_path / "run"
    kto = dict(kto_data_path=_subset(tiny["prefs"], tmp_path / "kto.jsonl", 320), kto_batch_size=32, kto_lr=2e-3,
               kto_epochs=2, kto_beta=0.1)
    cfg = base_config(tiny, save, stages=["sft", "kto"], policy_model_path=str(tiny_sft), **kto)
    out = create_rlhf_pipeline(cfg).run_full_pipeline()
    assert out == {"kto": save / "kto" / "best_model"} and not (save / "sft").exists()
    rows = read_metrics(save / "kto" / "metrics.jsonl")
    steps = [r for r in rows if "loss" in r]
    assert len(steps) == 2 * (576 // 32)  # 640 rows from 320 pairs, 64 held out
    # the policy starts as the reference: r = z0 = 0, every row costs 1/2 and none is on its label's side
    assert steps[0]["loss"] == pytest.approx(0.5, abs=1e-3) and steps[0]["accuracy"] == 0 == steps[0]["kl"]
    assert steps[-1]["loss"] < 0.8 * steps[0]["loss"]
    evals = [r for r in rows if "eval_accuracy" in r]
    assert len(evals) == 3 and evals[-1]["eval_accuracy"] > 0.8  # before training and after each epoch
    res = evaluate_model(load_config(cfg), {"sft": str(tiny_sft), "kto": str(out["kto"])}, num_prompts=64,
                         gold="rlhf_dist.demo:positive_label")
    before, after = (res["checkpoints"][k]["gold"] for k in ("sft", "kto"))
    print(f"desirable rate on 64 held-out prompts: sft {before:.3f} -> kto {after:.3f}")
    assert after > before + 0.2, (before, after)

