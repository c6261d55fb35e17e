"""Layouts: the shapes rows come in, named by their columns, and the one parser per kind of row.

A source's layout is detected from its first row's columns (`detect`) and logged; each row is then parsed by
its own columns, so a JSONL file mixing `messages` rows and `prompt`/`response` rows reads as it always has.
Other column names map onto these with the config's `{stage}_{column}_field` fields (`remap`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from .rows import (
    KTOExample,
    Message,
    PreferenceExample,
    PromptExample,
    RowError,
    SFTExample,
    as_messages,
    messages_field,
    text_field,
)


@dataclass(frozen=True)
class Layout:
    name: str
    kind: str  # sft | preference | prompt: the record it gives (`PARSERS`)
    columns: tuple[str, ...]  # a row with all of these is in this layout
    writers: str  # who writes rows like this, for the log and docs/data.md


# First match wins, so a row with `prompt` and `messages` (UltraFeedback) is a prompt row for PPO.
LAYOUTS: tuple[Layout, ...] = (
    Layout("messages", "sft", ("messages",), "OpenAI chat, TRL conversational language modelling, this project"),
    Layout("prompt/response", "sft", ("prompt", "response"), "this project"),
    Layout("prompt/completion", "sft", ("prompt", "completion"), "TRL prompt-completion (standard or conversational)"),
    Layout("prompt/chosen/rejected", "preference", ("prompt", "chosen", "rejected"),
           "this project, UltraFeedback-binarized, TRL explicit-prompt preference"),
    Layout("chosen/rejected", "preference", ("chosen", "rejected"),
           "HH-RLHF transcripts, TRL implicit-prompt preference (conversational)"),
    Layout("prompt/completion/label", "kto", ("prompt", "completion", "label"), "this project, TRL unpaired preference"),
    Layout("prompt/chosen/rejected", "kto", ("prompt", "chosen", "rejected"), "preference pairs, each split in two"),
    Layout("chosen/rejected", "kto", ("chosen", "rejected"), "HH-RLHF transcripts, each pair split in two"),
    Layout("prompt", "prompt", ("prompt",), "this project, TRL prompt-only"),
    Layout("messages", "prompt", ("messages",), "OpenAI chat: the turns before the last assistant reply"),
)
# The canonical columns of each kind: what `{stage}_{column}_field` can map (schema fields exist for these).
KIND_COLUMNS = {"sft": ("messages", "prompt", "response", "completion"), "preference": ("prompt", "chosen", "rejected"),
                "kto": ("prompt", "completion", "label"), "prompt": ("prompt",)}


def detect(kind: str, row: Any) -> Layout | None:
    """The layout of `row` (a JSON string row is a prompt in the `prompt` layout); None when no layout fits."""
    cols = row.keys() if isinstance(row, dict) else ("prompt",) if isinstance(row, str) and kind == "prompt" else ()
    return next((lay for lay in LAYOUTS if lay.kind == kind and all(c in cols for c in lay.columns)), None)


def expected(kind: str) -> str:
    return " | ".join("+".join(lay.columns) for lay in LAYOUTS if lay.kind == kind)


def remap(row: Any, columns: dict[str, tuple[str, str]]) -> Any:
    """Rename the user's columns to the canonical ones: `columns` is {canonical: (theirs, config field)}."""
    if not columns or not isinstance(row, dict):
        return row
    row = dict(row)
    for canon, (theirs, field) in columns.items():
        if theirs not in row:
            raise RowError(f"missing column '{theirs}' ({field})")
        row[canon] = row.pop(theirs)
    return row


def parse_sft_row(row: Any, where: str) -> SFTExample:
    if not isinstance(row, dict):
        raise RowError(f"expected an object, got {type(row).__name__}")
    if "messages" in row:
        msgs = messages_field(row["messages"], "messages")
        if not any(m["role"] == "assistant" for m in msgs) or not any(m["role"] == "user" for m in msgs):
            raise RowError("field 'messages' needs at least one user -> assistant turn")
        if msgs[-1]["role"] != "assistant":
            raise RowError("field 'messages' must end with an assistant message")
        for m in msgs:
            if m["role"] == "assistant" and not m["content"].strip():
                raise RowError("field 'messages' has an empty assistant message")
        return SFTExample(msgs, where, _others(row, "messages"))
    if "completion" in row:  # TRL: the completion is a string or the assistant's messages
        return SFTExample(as_messages(row, "prompt", "user") + as_messages(row, "completion", "assistant"), where,
                          _others(row, "prompt", "completion"))
    if "prompt" in row or "response" in row:
        return SFTExample(as_messages(row, "prompt", "user") + [{"role": "assistant", "content": text_field(row, "response")}],
                          where, _others(row, "prompt", "response"))
    raise RowError(f"missing field 'messages' (or 'prompt' and 'response'); expected columns {expected('sft')}")


def parse_preference_row(row: Any, where: str) -> PreferenceExample:
    if not isinstance(row, dict):
        raise RowError(f"expected an object, got {type(row).__name__}")
    if "prompt" in row:
        prompt = as_messages(row, "prompt", "user")
        chosen = _after(prompt, as_messages(row, "chosen", "assistant"))
        rejected = _after(prompt, as_messages(row, "rejected", "assistant"))
    else:
        prompt, chosen, rejected = split_shared_prompt(row)
    if chosen == rejected:
        raise RowError("'chosen' and 'rejected' are identical")
    margin = row.get("margin", 0.0)
    if isinstance(margin, bool) or not isinstance(margin, (int, float)):
        raise RowError(f"field 'margin' must be a number, got {type(margin).__name__}")
    return PreferenceExample(prompt, chosen, rejected, float(margin), where)


def _after(prompt: list[Message], side: list[Message]) -> list[Message]:
    """UltraFeedback-binarized repeats the prompt's turns at the start of `chosen` and `rejected`: drop them."""
    n = len(prompt)
    return side[n:] if len(side) > n and side[:n] == prompt else side


_HH_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant): ?")
_HH_ROLE = {"Human": "user", "Assistant": "assistant"}


def transcript_messages(text: str, key: str) -> list[Message]:
    """An HH-RLHF transcript ("\\n\\nHuman: ...\\n\\nAssistant: ...") -> messages."""
    parts = _HH_TURN.split(text)
    if parts[0].strip() or len(parts) < 3:
        raise RowError(f"field '{key}' is not a transcript of '\\n\\nHuman: ' and '\\n\\nAssistant: ' turns "
                       "(give a 'prompt' column for plain-text pairs)")
    return [{"role": _HH_ROLE[r], "content": c} for r, c in zip(parts[1::2], parts[2::2])]


def split_shared_prompt(row: dict) -> tuple[list[Message], list[Message], list[Message]]:
    """Implicit-prompt pairs (HH-RLHF, TRL): two whole conversations; their shared turns up to the last shared
    user turn are the prompt, what follows each is its response. No shared prefix is a bad row."""
    sides = []
    for key in ("chosen", "rejected"):
        v = row.get(key)
        sides.append(messages_field(v, key) if isinstance(v, list) else transcript_messages(text_field(row, key), key))
    chosen, rejected = sides
    k = 0
    while k < min(len(chosen), len(rejected)) and chosen[k] == rejected[k]:
        k += 1
    while k and chosen[k - 1]["role"] != "user":  # the prompt ends with the user's turn
        k -= 1
    if k == 0:
        raise RowError("'chosen' and 'rejected' share no prompt (no common turns ending with a user turn)")
    for key, side in (("chosen", chosen), ("rejected", rejected)):
        if len(side) == k or side[k]["role"] != "assistant":
            raise RowError(f"'{key}' has no assistant reply after the shared prompt")
    return chosen[:k], chosen[k:], rejected[k:]


def parse_prompt_row(row: Any, where: str) -> PromptExample:
    """A prompt and the row's other fields (`PromptExample.fields`, e.g. an `answer` for a reward function)."""
    if isinstance(row, str):
        if not row.strip():
            raise RowError("empty prompt")
        return PromptExample([{"role": "user", "content": row}], where)
    if not isinstance(row, dict):
        raise RowError(f"expected an object with 'prompt' or a string, got {type(row).__name__}")
    if "prompt" not in row and "messages" in row:
        msgs = messages_field(row["messages"], "messages")
        while msgs and msgs[-1]["role"] == "assistant":  # a reply to the prompt is not part of it
            msgs = msgs[:-1]
        if not msgs or msgs[-1]["role"] != "user":
            raise RowError("field 'messages' has no user turn to answer")
        return PromptExample(msgs, where, _others(row, "messages"))
    return PromptExample(as_messages(row, "prompt", "user"), where, _others(row, "prompt"))


def _others(row: dict, *used: str) -> dict[str, Any]:
    """The row's columns other than `used`: per-sample metadata for the rewards (e.g. an `answer`)."""
    return {k: v for k, v in row.items() if k not in used}


def parse_kto_row(row: Any, where: str) -> list[KTOExample]:
    """`{prompt, completion, label}` (label a bool: desirable or not) -> one example; a preference pair (any
    preference layout) -> two: chosen desirable, rejected undesirable."""
    if not isinstance(row, dict):
        raise RowError(f"expected an object, got {type(row).__name__}")
    if "label" not in row and "chosen" in row:
        p = parse_preference_row(row, where)
        return [KTOExample(p.prompt, p.chosen, True, where), KTOExample(p.prompt, p.rejected, False, where)]
    if not isinstance(row.get("label"), bool):
        raise RowError(f"field 'label' must be true or false, got {row.get('label')!r}" if "label" in row else
                       "missing field 'label' (true: desirable, false: undesirable), or 'chosen' and 'rejected'")
    return [KTOExample(as_messages(row, "prompt", "user"), as_messages(row, "completion", "assistant"),
                       row["label"], where)]


PARSERS = {"sft": parse_sft_row, "preference": parse_preference_row, "kto": parse_kto_row,
           "prompt": parse_prompt_row}
