"""`rlhf-dist eval` and `rlhf-dist report` on a run directory built without training (no Ray)."""

from __future__ import annotations

import json
import logging
import math
import shutil

import pytest
import torch

from rlhf_dist.config import load_config
from rlhf_dist.data.rows import DataError
from rlhf_dist.evaluation.evaluate import evaluate_model, load_eval_set, perplexity
from rlhf_dist.evaluation.results import COLUMNS
from rlhf_dist.io.checkpoint import atomic_dir
from rlhf_dist.io.report import make_report
from rlhf_dist.models.load import load_causal_lm, load_scalar_model, load_tokenizer, save_hf

GOLD = "rlhf_dist.demo:positivity_reward"
PNGS = ("sft_loss.png", "rm_accuracy.png", "ppo_reward.png", "ppo_kl.png", "ppo_losses.png", "ppo_response_length.png")


def _write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _metrics(save):
    sft = [{"step": s, "loss": 6.0 / s ** 0.5} for s in range(1, 61)]
    for r in sft[9::10]:
        r["eval_loss"] = r["loss"] + 0.1
    _write_jsonl(save / "sft/metrics.jsonl", [{"step": 0, "eval_loss": 6.2}] + sft + [{"summary": True, "seconds": 3.0}])
    rm = [{"step": s, "loss": 0.7 / s, "accuracy": min(1.0, 0.5 + s / 40)} for s in range(1, 31)]
    rm[-1]["eval_accuracy"] = 0.9
    _write_jsonl(save / "reward_model/metrics.jsonl", [{"step": 0, "eval_accuracy": 0.5}] + rm + [{"summary": True}])
    ppo = [{"iteration": i, "reward_mean": 0.1 * i, "reward_std": 1.0, "kl": 0.2 * i, "policy_loss": -0.01 * i,
            "value_loss": 1.0 / i, "response_length": 12 - i, "entropy": 4.0, "clip_frac": 0.05,
            "time/rollout": 0.1, "time/learner": 0.2} for i in range(1, 9)]
    _write_jsonl(save / "ppo/metrics.jsonl", ppo)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """tiny assets + save_dir with sft/best_model, reward_model/best_model, one PPO iteration and final_model."""
    from rlhf_dist.demo.tiny import build_tiny

    root = tmp_path_factory.mktemp("evalrun")
    tiny = build_tiny(root / "tiny", hidden_size=32, num_layers=1, intermediate_size=64)
    src, save = tiny["model"], root / "run"
    with atomic_dir(save / "sft/best_model") as tmp:
        shutil.copytree(src, tmp, dirs_exist_ok=True)
    tok = load_tokenizer(str(src))
    with atomic_dir(save / "reward_model/best_model") as tmp:
        torch.manual_seed(0)
        save_hf(load_scalar_model(str(src), pad_token_id=tok.pad_token_id), tok, tmp)
    with atomic_dir(save / "ppo/iteration_000002") as tmp:
        shutil.copytree(src, tmp / "policy")
    (save / "ppo/iteration_000004/policy").mkdir(parents=True)  # no COMPLETE marker: must be ignored
    policy = load_causal_lm(str(src))
    with torch.no_grad():
        policy.lm_head.weight.add_(0.5 * torch.randn_like(policy.lm_head.weight))  # so final differs from SFT
    with atomic_dir(save / "ppo/final_model") as tmp:
        save_hf(policy, tok, tmp)
    _metrics(save)
    cfg = {"model_name": str(src), "device": "cpu", "seed": 0, "max_length": 64, "sft_data_path": str(tiny["sft"]),
           "gen_max_new_tokens": 8, "save_dir": str(save)}
    cfg_path = root / "config.json"
    cfg_path.write_text(json.dumps(cfg))
    return {"save": save, "cfg": cfg, "cfg_path": cfg_path, "tiny": tiny}


def test_evaluate_model_all_checkpoints_and_metrics(run_dir):
    res = evaluate_model(load_config(run_dir["cfg"]), num_prompts=16, gold=GOLD)
    ck = res["checkpoints"]
    assert list(ck) == ["sft", "ppo/iteration_000002", "final"]  # training order, incomplete iteration skipped
    for name, m in ck.items():
        for col in (c for c in COLUMNS[1:] if c != "flagged"):  # flagged: only with a safety_filter
            assert isinstance(m[col], float) and math.isfinite(m[col]), (name, col)
        assert "flagged" not in m
        assert 0 <= m["win_rate_vs_sft"] <= 1 and 0 <= m["rougeL"] <= 1
    # The SFT policy against itself, and an identical copy of it: the same samples, no KL, all ties.
    for name in ("sft", "ppo/iteration_000002"):
        assert abs(ck[name]["kl_ref"]) < 1e-4
        assert ck[name]["win_rate_vs_sft"] == 0.5
    assert ck["sft"]["ppl"] == pytest.approx(ck["ppo/iteration_000002"]["ppl"])
    assert ck["final"]["ppl"] != pytest.approx(ck["sft"]["ppl"])
    assert ck["final"]["kl_ref"] > 1e-3  # samples of a different policy have positive k1 on average here
    assert res["settings"]["num_prompts"] == 16 and res["settings"]["gold"] == GOLD

    out = run_dir["save"] / "eval"
    saved = json.loads((out / "results.json").read_text())
    assert list(saved["checkpoints"]) == list(ck) and saved["settings"]["seed"] == 0
    md = (out / "results.md").read_text()
    assert "| " + " | ".join(COLUMNS) + " |" in md
    assert all(f"| {name} |" in md for name in ck)


def test_gold_only_when_set_and_explicit_checkpoints(run_dir):
    sft = str(run_dir["save"] / "sft/best_model")
    res = evaluate_model(load_config(run_dir["cfg"]), {"mine": sft}, num_prompts=4)
    m = res["checkpoints"]["mine"]
    assert "gold" not in m and res["settings"]["gold"] is None
    assert abs(m["kl_ref"]) < 1e-4 and m["win_rate_vs_sft"] == 0.5


def test_pipeline_evaluate_model_delegates(run_dir):
    from rlhf_dist.pipeline import create_rlhf_pipeline

    sft = str(run_dir["save"] / "sft/best_model")
    kw = {"num_prompts": 3, "data_path": str(run_dir["tiny"]["eval"]), "gold": GOLD, "batch_size": 2}
    res = create_rlhf_pipeline(run_dir["cfg"]).evaluate_model({"mine": sft}, **kw)
    assert list(res["checkpoints"]) == ["mine"] and "gold" in res["checkpoints"]["mine"]
    assert res["settings"]["num_prompts"] == 3 and res["settings"]["gold"] == GOLD
    again = evaluate_model(load_config(run_dir["cfg"]), {"mine": sft}, **kw)
    for r in (res, again):
        r["checkpoints"]["mine"].pop("seconds")  # wall time: the one thing that differs
    assert res == again  # seeded: the same numbers from the same arguments


def test_perplexity_matches_the_sft_loss(run_dir):
    from rlhf_dist.steps.sft import sft_batch, sft_loss

    path = str(run_dir["save"] / "sft/best_model")
    tok, model = load_tokenizer(path), load_causal_lm(path).eval()
    es = load_eval_set(tok, run_dir["tiny"]["eval"], 8, 64)
    with torch.no_grad():
        _, st = sft_loss(model, sft_batch(es.conversations, tok.pad_token_id), 1.0)
    assert perplexity(model, es.conversations, tok.pad_token_id, "cpu", 3) == pytest.approx(
        math.exp(st["loss_sum"] / st["count"]), rel=1e-4)


def test_missing_eval_data_names_the_option(run_dir, tmp_path):
    (tmp_path / "sft.jsonl").write_text(run_dir["tiny"]["sft"].read_text())
    cfg = load_config({**run_dir["cfg"], "sft_data_path": str(tmp_path / "sft.jsonl")})
    with pytest.raises(DataError, match="--data"):
        evaluate_model(cfg, num_prompts=2)


def test_make_report_writes_every_png(run_dir):
    report = make_report(run_dir["save"])
    md = report.read_text()
    for name in PNGS:
        png = report.parent / name
        assert png.stat().st_size > 1000
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({name})" in md  # relative link
    assert "| PPO reward mean (last) | 0.8 |" in md


def test_make_report_skips_missing_stages(tmp_path):
    _metrics(tmp_path)
    shutil.rmtree(tmp_path / "ppo")
    (tmp_path / "reward_model/metrics.jsonl").write_text('{"summary": true}\n')
    md = make_report(tmp_path).read_text()
    assert "ppo/metrics.jsonl` not found" in md and "reward_model/metrics.jsonl` has no metric rows" in md
    assert (tmp_path / "report/sft_loss.png").is_file() and not (tmp_path / "report/ppo_kl.png").exists()


def test_make_report_has_a_section_for_every_stage(tmp_path):
    """Every row of the stage table gets its section, DPO included (accuracy per step, with its eval)."""
    from rlhf_dist.config.stages import STAGES

    _metrics(tmp_path)
    dpo = [{"step": s, "loss": 0.69 / s, "accuracy": min(1.0, 0.5 + s / 20)} for s in range(1, 11)]
    dpo[4]["eval_accuracy"], dpo[-1]["eval_accuracy"] = 0.8, 0.7
    _write_jsonl(tmp_path / "dpo/metrics.jsonl", dpo + [{"summary": True, "seconds": 2.0}])
    kto = [{"step": 0, "eval_accuracy": 0.0}] + [{"step": s, "loss": 0.5 - s / 100, "accuracy": s / 10}
                                                for s in range(1, 9)] + [{"step": 8, "eval_accuracy": 0.85}]
    _write_jsonl(tmp_path / "kto/metrics.jsonl", kto)
    md = make_report(tmp_path).read_text()
    for stage in STAGES.values():
        assert f"### {stage.report.title}" in md, stage.name
    assert (tmp_path / "report/dpo_accuracy.png").is_file()
    assert "| DPO eval accuracy (best) | 0.8 |" in md and "| DPO wall time (s) | 2.0 |" in md
    assert (tmp_path / "report/kto_accuracy.png").is_file() and "| KTO eval accuracy (best) | 0.85" in md


def test_cli_eval_and_report(run_dir, capsys):
    from rlhf_dist.cli.commands import main

    try:
        rc = main(["eval", str(run_dir["cfg_path"]), "--num-prompts", "4", "--gold", GOLD,
                   "--checkpoints", f"sft={run_dir['save'] / 'sft/best_model'}",
                   f"it2={run_dir['save'] / 'ppo/iteration_000002'}"])  # an iteration dir: its policy/ is used
        out = capsys.readouterr().out
        assert rc == 0
        assert out.splitlines()[0] == "| " + " | ".join(COLUMNS) + " |"
        assert "| sft |" in out and "| it2 |" in out
        assert main(["report", str(run_dir["save"])]) == 0
        assert capsys.readouterr().out.strip().endswith("report.md")
        assert main(["eval", str(run_dir["cfg_path"]), "--checkpoints", "no-equals-sign"]) == 2
    finally:
        # setup_logging pointed handlers at capsys's stream; do not leave them to later tests.
        root = logging.getLogger()
        for h in [h for h in root.handlers if getattr(h, "_rlhf_dist", False)]:
            root.removeHandler(h)
