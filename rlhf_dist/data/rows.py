"""Rows: the records every stage reads (SFT conversations, preference pairs, prompts), the errors that name a
row, and the helpers that read text and message lists. The parsers of every layout (the project's own JSONL
schema, HH-RLHF, UltraFeedback, TRL, OpenAI `messages`) are in `layouts.py`; where rows come from (files, globs, `save_to_disk`, the hub) in `sources.py`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

Message = dict[str, str]  # {"role": ..., "content": ...}
ROLES = ("system", "user", "assistant")


class DataError(ValueError):
    """A data problem; the message names the config field and the source, or the row (`file:line`)."""


class RowError(Exception):
    """Raised by row parsers; the reader adds where the row is (`file:line`, or `source[split]:index`)."""


@dataclass
class ReadStats:
    rows: int = 0
    blank: int = 0
    skipped: int = 0
    truncated: int = 0
    skipped_examples: list[str] = field(default_factory=list)
    layout: str = ""  # the layout the rows were read in (`layouts.LAYOUTS`)

    def summary(self) -> str:
        return (f"{self.rows} rows, {self.blank} blank lines skipped, {self.skipped} bad rows skipped, "
                f"{self.truncated} rows truncated")


def text_field(row: dict, key: str) -> str:
    if key not in row:
        raise RowError(f"missing field '{key}'")
    v = row[key]
    if not isinstance(v, str):
        raise RowError(f"field '{key}' must be a string, got {type(v).__name__}")
    if not v.strip():
        raise RowError(f"field '{key}' is empty")
    return v


def messages_field(v: Any, key: str) -> list[Message]:
    if not isinstance(v, list) or not v:
        raise RowError(f"field '{key}' must be a non-empty list of messages")
    out = []
    for i, m in enumerate(v):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise RowError(f"field '{key}[{i}]' must be an object with 'role' and 'content'")
        if m["role"] not in ROLES:
            raise RowError(f"field '{key}[{i}].role' must be one of {ROLES}, got {m['role']!r}")
        if not isinstance(m["content"], str):
            raise RowError(f"field '{key}[{i}].content' must be a string")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def as_messages(row: dict, key: str, role: str) -> list[Message]:
    v = row.get(key)
    if isinstance(v, list):
        return messages_field(v, key)
    return [{"role": role, "content": text_field(row, key)}]


@dataclass
class SFTExample:
    messages: list[Message]
    where: str
    fields: dict[str, Any] = field(default_factory=dict)  # the row's other columns (eval's gold function gets them)


@dataclass
class PreferenceExample:
    prompt: list[Message]
    chosen: list[Message]
    rejected: list[Message]
    margin: float
    where: str


@dataclass
class KTOExample:
    prompt: list[Message]
    completion: list[Message]
    desirable: bool
    where: str


@dataclass
class PromptExample:
    prompt: list[Message]
    where: str
    fields: dict[str, Any] = field(default_factory=dict)  # the row's other columns (e.g. `answer`), for rewards
