"""The reward-source protocol and the records around it: what a source scores (`RewardBatch`), what it
returns (`Scored`), and what the reward role returns to the driver (`RewardOutput`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from ..algo import Outcome
from ..data.rows import Message


@dataclass
class RewardBatch:
    """The samples one call scores."""

    prompts: list[list[Message]]  # each sample's conversation up to the response
    responses: list[str]  # the decoded responses
    sample_ids: list[int]
    metadata: list[dict[str, Any]]  # each sample's prompt row, less its prompt (e.g. {"answer": "42"})
    sequences: torch.Tensor | None = None  # (B, P+R) the policy's tokens, for a reward model that shares them
    attention_mask: torch.Tensor | None = None  # (B, P+R)

    @property
    def prompt_texts(self) -> list[str]:
        """What a function or a server sees as the prompt: the last message before the response."""
        return [p[-1]["content"] for p in self.prompts]

    def __len__(self) -> int:
        return len(self.responses)


@dataclass
class Scored:
    """One source's verdict on a batch."""

    scores: torch.Tensor  # (B,) float32; meaningless (NaN) where the outcome is not OK
    outcomes: torch.Tensor  # (B,) int8 `algo.Outcome`
    detail: str | None = None  # the first failure, for the log (never a URL or a token)

    @classmethod
    def ok(cls, scores: torch.Tensor) -> "Scored":
        return cls(scores.float(), torch.full(scores.shape, Outcome.OK, dtype=torch.int8))

    @property
    def failed(self) -> int:
        return int((self.outcomes != Outcome.OK).sum())


@dataclass
class SourceContext:
    """What building a source may need beyond the config (the reward role's or eval's)."""

    device: torch.device
    bf16: bool
    policy_tok: Any  # the tokenizer the responses were generated with
    reward_model_dir: str | None  # resolved by the caller (`io.sources.reward_model`)


class RewardSource(Protocol):
    """Score a batch: a score and an `Outcome` per sample. A sample it cannot score is a timeout or an
    error, never a made-up score; a bug (an exception) propagates."""

    def score(self, batch: RewardBatch) -> Scored: ...


@dataclass
class RewardOutput:
    """What the reward role returns for its slice of the batch."""

    responses: list[str]
    score: torch.Tensor  # (B,) the weighted sum of the sources' scores; 0 where the outcome failed
    outcome: torch.Tensor  # (B,) int8 `algo.Outcome`, the worst of the sources'
    sources: dict[str, Scored] = field(default_factory=dict)  # each source's own, by its name in the table

    def __len__(self) -> int:
        return len(self.responses)


def merge_outputs(parts: list[RewardOutput]) -> RewardOutput:
    """The reward workers' slices, in order, as one output."""
    cat = torch.cat
    names = list(parts[0].sources)
    return RewardOutput([r for p in parts for r in p.responses], cat([p.score for p in parts]),
                        cat([p.outcome for p in parts]),
                        {n: Scored(cat([p.sources[n].scores for p in parts]), cat([p.sources[n].outcomes for p in parts]),
                                   next((p.sources[n].detail for p in parts if p.sources[n].detail), None))
                         for n in names})
