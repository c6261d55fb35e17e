"""The SFT stage: conversations, a causal LM, and the NLL of the assistant tokens (`steps.sft`)."""

from __future__ import annotations

from ..data.encode import tokenize_sft
from ..data.read import read_dataset
from ..data.rows import ReadStats
from ..data.sources import data_spec
from ..models.load import load_causal_lm
from ..steps.sft import sft_batch, sft_count, sft_loss


def task_parts(cfg, tok, model_dir: str, bf16: bool) -> tuple[list, ReadStats, dict]:
    """The SFT stage's data (conversations) and Task fields: a causal LM trained on the assistant tokens."""
    rows, stats = read_dataset(data_spec(cfg, "sft_data_path", "sft"), "sft", cfg.bad_rows, cfg.max_bad_fraction)
    items = tokenize_sft(tok, rows, cfg.max_length, cfg.truncate, stats)
    model = lambda: load_causal_lm(model_dir, bf16, cfg.attn_implementation)  # noqa: E731
    return items, stats, dict(model=model, batch=lambda it: sft_batch(it, tok.pad_token_id),
                              loss=sft_loss, count=sft_count, higher_is_better=False, eval_every=cfg.sft_eval_every)
