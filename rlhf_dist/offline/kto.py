"""The KTO stage: labelled completions (or preference pairs, split), the policy, and the KTO loss against the
reference's log-probs and the step's KL estimate (`steps.kto`)."""

from __future__ import annotations

from dataclasses import replace

from ..data.encode import tokenize_kto
from ..data.read import read_dataset
from ..data.rows import ReadStats
from ..data.sources import data_spec
from ..models.load import load_causal_lm
from ..models.packing import one_row
from ..steps.kto import KTOItem, attach_reference, kl_rows, kl_sums, kto_batch, kto_count, kto_step_loss, unrelated_rows


def task_parts(cfg, tok, model_dir: str, bf16: bool) -> tuple[list, ReadStats, dict]:
    """The KTO stage's data (kto_data_path: a row per labelled completion, two per preference pair) and Task
    fields: the policy, with the reference's log-probs attached once before training, and the step's
    mismatched pairs as its no-grad pass (the reference point's KL estimate)."""
    lines, stats = read_dataset(data_spec(cfg, "kto_data_path", "kto"), "kto", cfg.bad_rows, cfg.max_bad_fraction)
    rows = [r for line in lines for r in line]
    seqs = tokenize_kto(tok, rows, cfg.max_length, cfg.truncate, stats)
    partner = unrelated_rows([repr(r.prompt) for r in rows], cfg.seed)
    # A mismatched pair is a sample, not a row the user wrote: fitted to max_length silently.
    mixed = [replace(r, completion=rows[j].completion) for r, j in zip(rows, partner)]
    kls = tokenize_kto(tok, mixed, cfg.max_length, True, ReadStats())
    items = [KTOItem(s, k, r.desirable) for s, k, r in zip(seqs, kls, rows)]
    return items, stats, dict(
        model=lambda: load_causal_lm(model_dir, bf16, cfg.attn_implementation),
        batch=lambda it: kto_batch(it, tok.pad_token_id),
        loss=lambda m, b, n: kto_step_loss(m, b, n, cfg.kto_beta, cfg.kto_desirable_weight,
                                           cfg.kto_undesirable_weight),
        count=kto_count, higher_is_better=True, eval_every=0, stats=("accuracy", "reward_margin", "kl"),
        step_items=kl_rows, step_sums=kl_sums,
        prepare=lambda m, to_dev, it, micro: attach_reference(m, to_dev, it, tok.pad_token_id, micro,
                                                              cfg.kto_max_tokens_per_micro_batch,
                                                              one_row(cfg.attn_implementation)))
