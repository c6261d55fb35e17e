"""What `rlhf-dist eval` reports: a checkpoint's metrics row from its raw pass, the settings, the table, and
save_dir/eval/results.{json,md}."""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

from ..rewards.safety import flagged_rate

log = logging.getLogger(__name__)

COLUMNS = ("checkpoint", "ppl", "bleu", "rougeL", "rm_score", "kl_ref", "win_rate_vs_sft", "gold", "flagged")
_FORMATS = {"ppl": "{:.2f}", "bleu": "{:.2f}", "rougeL": "{:.3f}", "rm_score": "{:+.3f}", "kl_ref": "{:.3f}",
            "win_rate_vs_sft": "{:.3f}", "gold": "{:+.3f}", "flagged": "{:.3f}"}
NUM_SAMPLES_SAVED = 5  # example generations kept per checkpoint in results.json


def text_metrics(hyps: list[str], refs: list[str]) -> tuple[float, float]:
    """(corpus BLEU 0-100, mean ROUGE-L F1 0-1)."""
    import sacrebleu  # deferred: only eval's text metrics need these two
    from rouge_score import rouge_scorer

    bleu = sacrebleu.corpus_bleu(hyps, [refs]).score
    logging.getLogger("absl").setLevel(logging.WARNING)  # "Using default tokenizer." on every scorer
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    rouge = sum(scorer.score(r, h)["rougeL"].fmeasure for h, r in zip(hyps, refs)) / max(1, len(refs))
    return float(bleu), float(rouge)


def metrics_row(run: Any, path: str, r: dict[str, Any], baseline: dict[str, Any] | None) -> dict[str, Any]:
    """A checkpoint's row of results.json from its `raw_pass` (and the baseline's, for the win rate); `run`: an
    `evaluate.EvalRun` (not imported: evaluate imports this module)."""
    es = run.es
    bleu, rouge = text_metrics(r["responses"], es.references)
    m: dict[str, Any] = {
        "path": path, "ppl": r["ppl"], "bleu": bleu, "rougeL": rouge,
        "rm_score": r["rm"].mean().item() if run.rm else None,
        "kl_ref": r["kl"].mean().item(),
        "win_rate_vs_sft": None, "gold": None,
        "response_length": r["lengths"].mean().item(), "seconds": r["seconds"],
    }
    if run.rm:
        a, b = r["rm"], baseline["rm"]  # (N,), (N,)
        m["win_rate_vs_sft"] = ((a > b).float() + 0.5 * (a == b).float()).mean().item()
    if r["gold"] is not None:  # a `rewards.base.Scored`: the mean over the responses it scored
        ok = r["gold"].outcomes == 0  # (N,) algo.Outcome.OK
        m["gold"] = r["gold"].scores[ok].mean().item() if ok.any() else None
    else:
        m.pop("gold")
    if not run.rm:
        del m["rm_score"], m["win_rate_vs_sft"]
    if run.safety:
        verdicts = run.safety(es.prompt_texts, r["responses"])
        m["flagged"] = flagged_rate(verdicts)
        m["flagged_examples"] = [{"prompt": es.prompt_texts[i], "response": r["responses"][i], "reason": v.reason}
                                 for i, v in enumerate(verdicts) if v.flagged][:NUM_SAMPLES_SAVED]
    m["samples"] = [{"prompt": es.prompt_texts[i], "reference": es.references[i], "response": r["responses"][i]}
                    for i in range(min(NUM_SAMPLES_SAVED, len(es)))]
    return m


def eval_settings(run: Any) -> dict[str, Any]:
    """results.json's settings: what the numbers were measured on and how."""
    import sacrebleu  # deferred: only eval's text metrics need it

    cfg = run.cfg
    return {
        "data": str(run.data), "num_prompts": len(run.es), "seed": cfg.seed, "device": run.device, "bf16": run.bf16,
        "batch_size": run.batch_size, "gen_max_new_tokens": cfg.gen_max_new_tokens,
        "gen_temperature": cfg.gen_temperature, "gen_top_p": cfg.gen_top_p, "gen_top_k": cfg.gen_top_k,
        "reference": run.reference, "win_rate_baseline": run.reference if run.rm else None,
        "reward_model": run.reward_model, "gold": run.gold, "safety_filter": cfg.safety_filter,
        "kl_estimator": "k1 (sum over response tokens, logprobs at gen_temperature)",
        "bleu": f"sacrebleu {sacrebleu.__version__} corpus_bleu", "rougeL": "rouge_score rougeL F1, porter stemmer",
        "notes": run.notes,
    }


def format_table(results: dict) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join(["---"] + ["---:"] * (len(COLUMNS) - 1)) + "|"]
    for name, m in results["checkpoints"].items():
        cells = [name] + [_FORMATS[c].format(m[c]) if m.get(c) is not None else "-" for c in COLUMNS[1:]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_results(out: Path, results: dict) -> None:
    """results.json (NaN as null) and results.md into `out`, each replaced atomically."""
    out.mkdir(parents=True, exist_ok=True)
    _write_atomic(out / "results.json", json.dumps(_finite(results), indent=2) + "\n")
    _write_markdown(out / "results.md", results)
    log.info("eval results: %s, %s", out / "results.json", out / "results.md")


def _write_markdown(path: Path, results: dict) -> None:
    s = results["settings"]
    lines = ["# Evaluation", "", format_table(results), "",
             f"{s['num_prompts']} prompts from `{s['data']}`; one sample per prompt (seed {s['seed']}, "
             f"temperature {s['gen_temperature']}, top_p {s['gen_top_p']}, top_k {s['gen_top_k']}, "
             f"max {s['gen_max_new_tokens']} new tokens). Reference policy: `{s['reference']}`; "
             f"reward model: `{s['reward_model'] or 'none'}`; gold: `{s['gold'] or 'none'}`.", "",
             "- ppl: perplexity of the reference responses (assistant tokens, teacher-forced)",
             "- bleu: sacrebleu corpus BLEU (0-100); rougeL: mean ROUGE-L F1 against the references",
             "- rm_score: mean reward-model score; win_rate_vs_sft: RM prefers it to the SFT response (ties 1/2)",
             "- kl_ref: mean over prompts of the summed log-ratio to the reference on the policy's samples (k1)",
             f"- flagged: share of responses the safety filter `{s.get('safety_filter') or 'none'}` flags"]
    lines += [f"- note: {n}" for n in s["notes"]]
    _write_atomic(path, "\n".join(lines) + "\n")


def _write_atomic(path: Path, text: str) -> None:
    # Not io.checkpoint.write_json_atomic: that sorts keys, and results.json keeps checkpoints in training order.
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _finite(obj: Any) -> Any:
    """NaN/inf -> None, so results.json stays valid JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj
