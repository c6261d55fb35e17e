"""The reward model as a reward source: a frozen scalar head over the prompt and response."""

from __future__ import annotations

import logging

import torch

from ..data.encode import encode_prompt_response, pad_right
from ..models.load import load_scalar_model, load_tokenizer, sequence_scores
from ..steps.forwards import forward_chunks
from .base import RewardBatch, Scored, SourceContext

log = logging.getLogger(__name__)


class RewardModelSource:
    """Scores the policy's own tokens when the reward model shares the policy's vocabulary and chat
    template; else re-tokenises the decoded text with its own. Forwards in chunks (`forward_chunks`)."""

    def __init__(self, cfg, model_dir: str, ctx: SourceContext):
        self.cfg, self.device = cfg, ctx.device
        self.tok = load_tokenizer(model_dir)
        self.model = load_scalar_model(model_dir, ctx.bf16, self.tok.pad_token_id,
                                       cfg.attn_implementation).to(ctx.device).eval()
        self.model.requires_grad_(False)
        self.same_tokens = (self.tok.get_vocab() == ctx.policy_tok.get_vocab()
                            and self.tok.chat_template == ctx.policy_tok.chat_template)
        log.info("reward model %s; %s", model_dir,
                 "same tokenizer as the policy" if self.same_tokens else "different tokenizer: re-tokenising text")

    @torch.no_grad()
    def score(self, batch: RewardBatch) -> Scored:
        if self.same_tokens and batch.sequences is not None:
            ids, attn = batch.sequences, batch.attention_mask  # (B, P+R)
        else:
            enc = [encode_prompt_response(self.tok, p, r).input_ids for p, r in zip(batch.prompts, batch.responses)]
            ids, attn = pad_right(enc, self.tok.pad_token_id)  # (B, T)
        d = self.device
        return Scored.ok(forward_chunks(lambda i, a, p: sequence_scores(self.model, i.to(d), a.to(d),
                                                                        p and p.to(d)).float(),
                                        self.cfg, ids, attn))  # (B,)


def build(cfg, ctx: SourceContext) -> RewardModelSource:
    if ctx.reward_model_dir is None:
        raise FileNotFoundError(f"reward_model_weight is {cfg.reward_model_weight:g} but no reward model was found "
                                "(reward_model_path, or the reward stage's reward_model/best_model)")
    return RewardModelSource(cfg, ctx.reward_model_dir, ctx)
