"""The safety filter: rule files (and their errors, naming the line), a classifier, the penalty and drop
actions on a batch (drop keeps the batch arithmetic: the losses and group baselines of the kept rollouts
alone), eval's flagged rate, and PPO with a penalty lowering the flagged words' rate end to end."""

import json

import pytest
import torch
from conftest import base_config, iteration_rows

from rlhf_dist.algo import aggregate_loss, grpo_advantages, loss_units, safety_adjust
from rlhf_dist.config import ConfigError, load_config
from rlhf_dist.rewards.safety import Verdict, flagged_rate, load_safety_filter

pytestmark = pytest.mark.timeout(900)


def _rules(tmp_path, text: str) -> str:
    path = tmp_path / "rules.txt"
    path.write_text(text)
    return str(path)


def test_rule_file_flags_demo_words(tmp_path):
    spec = _rules(tmp_path, "# the demo's negative words, and a phrase\nterrible\n\n  re:aw+ful  \nvery dull\n")
    check = load_safety_filter(spec)
    responses = ["The park is TERRIBLE and sad.", "The city is awwwful.", "The river is very  dull.",
                 "The river is very dull.", "Terribleness is not a word here.", "The cat is wonderful."]
    verdicts = check(["p"] * len(responses), responses)
    assert [v.flagged for v in verdicts] == [True, True, False, True, False, False]
    assert verdicts[0].reason == "rule 'terrible' matched 'TERRIBLE'"
    assert verdicts[1].reason == "rule 're:aw+ful' matched 'awwwful'"
    assert verdicts[5] == Verdict(False, "")
    assert flagged_rate(verdicts) == pytest.approx(0.5)


@pytest.mark.parametrize("text, message", [
    ("terrible\n# fine\nre:(unclosed\n", r"rules.txt:3: bad regular expression '\(unclosed'"),
    ("terrible\nre:\n", "rules.txt:2: empty pattern after 're:'"),
    ("# only a comment\n\n", "rules.txt has no rules"),
])
def test_bad_rule_file_names_its_line(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        load_safety_filter(_rules(tmp_path, text))


def classify(prompts, responses):
    """A classifier for test_classifier (`test_safety:classify`)."""
    return [(len(r) > 5, "long") for r in responses]


def test_classifier_and_config(tmp_path):
    verdicts = load_safety_filter("test_safety:classify")(["a", "b"], ["short", "longer one"])
    assert verdicts == [Verdict(False, ""), Verdict(True, "long")]
    with pytest.raises(ConfigError, match="safety_filter: cannot load test_safety:nope"):
        load_safety_filter("test_safety:nope")
    with pytest.raises(ConfigError, match="safety_filter: rule file missing.txt not found"):
        load_safety_filter("missing.txt")
    with pytest.raises(ConfigError, match="safety_penalty: only used with a safety_filter"):
        load_config({"model_name": "m", "safety_penalty": 2.0})
    cfg = load_config({"model_name": "m", "safety_filter": "test_safety:classify", "safety_action": "drop"})
    assert cfg.safety_action == "drop" and cfg.safety_penalty == 1.0


def test_penalize_by_hand():
    scores, mask = torch.tensor([1.0, 0.5, -0.5]), torch.ones(3, 4)  # (B,), (B, R)
    out, dropped = safety_adjust(scores, torch.tensor([False, True, True]), 1, "penalize", 2.0)
    torch.testing.assert_close(out, torch.tensor([1.0, -1.5, -2.5]))
    assert not dropped.any() and mask.shape == (3, 4)


def test_drop_keeps_the_batch_arithmetic():
    """Dropping rollout 2 (of groups of 2) drops its group; the batch keeps its 6 rows (mini-batches and
    groups still divide), and every loss aggregation and the GRPO baseline equal those of the kept rows alone."""
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(6, generator=g)  # (B,)
    per_token = torch.randn(6, 5, generator=g)  # (B, R)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1],
                         [1, 0, 0, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 0, 0]])  # (B, R)
    flagged = torch.tensor([False, False, True, False, False, False])
    out, dropped = safety_adjust(scores, flagged, 2, "drop", 1.0)
    kept_mask = mask * (~dropped)[:, None]  # (B, R): what make_experience does to the samples not kept
    assert dropped.tolist() == [False, False, True, True, False, False] and kept_mask.shape == (6, 5)
    assert torch.equal(out, scores) and kept_mask[2:4].sum() == 0 and torch.equal(kept_mask[[0, 1, 4, 5]],
                                                                                  mask[[0, 1, 4, 5]])
    keep = [0, 1, 4, 5]
    for mode in ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum"):
        whole = aggregate_loss(per_token, kept_mask, mode, loss_units(kept_mask, mode))
        alone = aggregate_loss(per_token[keep], mask[keep], mode)
        torch.testing.assert_close(whole, alone, msg=mode)
    assert loss_units(kept_mask, "seq_mean_token_mean") == 4
    adv = grpo_advantages(out, 2)  # (B,): per-group baselines; the dropped group's is its own
    torch.testing.assert_close(adv[keep], grpo_advantages(scores[keep], 2))
    with pytest.raises(ValueError, match="unknown safety action 'mask'"):
        safety_adjust(scores, flagged, 2, "mask", 1.0)


def test_eval_reports_the_flagged_rate(tiny, tmp_path):
    """`rlhf-dist eval` gives each checkpoint a flagged column and a few flagged examples with their reasons."""
    from rlhf_dist.evaluation.evaluate import evaluate_model
    from rlhf_dist.evaluation.results import format_table

    rules = _rules(tmp_path, "re:\\w+\n")  # every non-empty response
    cfg = load_config({"model_name": str(tiny["model"]), "device": "cpu", "max_length": 64, "gen_max_new_tokens": 4,
                       "sft_data_path": str(tiny["sft"]), "save_dir": str(tmp_path / "run"), "safety_filter": rules})
    res = evaluate_model(cfg, {"base": str(tiny["model"])}, num_prompts=4)
    m = res["checkpoints"]["base"]
    assert 0 < m["flagged"] <= 1 and m["flagged_examples"][0]["reason"].startswith("rule 're:\\\\w+' matched")
    assert res["settings"]["safety_filter"] == rules and "| flagged |" in format_table(res)


@pytest.mark.slow
def test_ppo_penalty_lowers_the_flagged_rate(tiny, tiny_sft, tmp_path, local_ray):
    """A rule file flagging "is", a word of 4 of the demo's 6 answer templates; PPO from the SFT model with the
    positivity reward and the default penalty (1.0): the flagged rate of the rollouts, and eval's on held-out
    prompts, fall, while the answers stay sentences (a policy that stopped answering would dodge the filter
    too) and turn positive."""
    from rlhf_dist.evaluation.evaluate import evaluate_model
    from rlhf_dist.pipeline import create_rlhf_pipeline

    save = tmp_path / "run"
    rules = _rules(tmp_path, "# a word of the demo's answers\nis\n")
    cfg = base_config(tiny, save, policy_model_path=str(tiny_sft), safety_filter=rules,
                      reward_fn="rlhf_dist.demo:positivity_reward", reward_model_weight=0.0, ppo_iterations=8,
                      ppo_batch_size=32, ppo_mini_batch_size=16, ppo_epochs=2, ppo_lr_policy=1e-3, kl_coef=0.01,
                      save_interval=8)
    create_rlhf_pipeline(cfg).run_ppo_training()
    rows = iteration_rows(save)
    rates = [r["safety/flagged_rate"] for r in rows]
    print("rollout flagged rate per iteration:", [round(x, 3) for x in rates],
          "response length:", [round(r["response_length"], 1) for r in rows])
    assert sum(rates[-3:]) / 3 < sum(rates[:2]) / 2 - 0.2, rates
    assert min(r["response_length"] for r in rows[-3:]) >= 5
    flagged = [json.loads(line) for line in (save / "ppo" / "samples.jsonl").read_text().splitlines()]
    flagged = [r for r in flagged if "safety" in r]
    assert flagged and all(r["safety"].lower() == "rule 'is' matched 'is'" and r["safety_action"] == "penalize"
                           for r in flagged)
    res = evaluate_model(load_config(cfg), {"sft": str(tiny_sft), "ppo": str(save / "ppo" / "final_model")},
                         num_prompts=64, gold="rlhf_dist.demo:positive_label")
    (before, pos_before), (after, pos_after) = ((res["checkpoints"][k]["flagged"], res["checkpoints"][k]["gold"])
                                                for k in ("sft", "ppo"))
    print(f"eval on 64 held-out prompts: flagged sft {before:.3f} -> ppo {after:.3f}; "
          f"positive sft {pos_before:.3f} -> ppo {pos_after:.3f}")
    assert after < before - 0.2, (before, after)


def test_driver_call_drops_and_records(tmp_path):
    """The driver's one call (`online.safety.SafetyCheck`) in drop mode: the flagged rollout's group is dropped
    (the driver takes it out of the kept samples), the metrics count it, and its samples.jsonl row carries the
    reason."""
    from types import SimpleNamespace

    from rlhf_dist.online.safety import SafetyCheck

    cfg = load_config({"model_name": "m", "safety_filter": _rules(tmp_path, "terrible\n"), "safety_action": "drop",
                       "n_samples_per_prompt": 2, "algorithm": "grpo"})
    prompts = [SimpleNamespace(prompt=[{"role": "user", "content": f"Tell me about topic {i}."}]) for i in range(2)]
    responses = ["It is nice.", "It is terrible.", "It is kind.", "It is calm."]
    scores, dropped, rec, rows = SafetyCheck(cfg, prompts)(4, [0, 1, 2, 3], torch.tensor([1.0, -1.0, 1.0, 1.0]),
                                                           responses)
    assert dropped.tolist() == [True, True, False, False]
    assert scores.tolist() == [1.0, -1.0, 1.0, 1.0]
    assert rec == {"safety/flagged_rate": 0.25, "safety/dropped": 2}
    assert rows == [{"iteration": 5, "sample_id": 1, "group": 0, "prompt": "Tell me about topic 0.",
                     "response": "It is terrible.", "reward": -1.0, "safety": "rule 'terrible' matched 'terrible'",
                     "safety_action": "drop"}]
