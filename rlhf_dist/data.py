"""JSONL datasets (SFT conversations, preference pairs, KTO's labelled completions, PPO prompts) and the one
formatting function.

Every row is decoded with msgspec one line at a time; a bad row is an error naming `file:line` and
the field, or, with `bad_rows: skip`, is counted and reported. Handling of the byte level, documented
in the README: a UTF-8 BOM at the start of a file and CRLF line endings are accepted; blank lines are
skipped and counted; invalid UTF-8 is a bad row.

`encode_conversation` is the single place where text becomes tokens: SFT rows, both sides of a
preference pair and PPO prompts all pass through it, so what the reward model scores during PPO looks
exactly like what it was trained on.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import msgspec

log = logging.getLogger(__name__)

Message = dict[str, str]  # {"role": ..., "content": ...}
ROLES = ("system", "user", "assistant")


class DataError(ValueError):
    """A data problem; the message starts with `file:line:`."""


class RowError(Exception):
    """Raised by row parsers; the reader adds `file:line`."""


@dataclass
class ReadStats:
    rows: int = 0
    blank: int = 0
    skipped: int = 0
    truncated: int = 0
    skipped_examples: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (f"{self.rows} rows, {self.blank} blank lines skipped, {self.skipped} bad rows skipped, "
                f"{self.truncated} rows truncated")


def iter_jsonl(path: str | Path, stats: ReadStats) -> Iterator[tuple[str, Any]]:
    """Yield (`file:line`, decoded JSON value) for each non-blank line."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: data file not found")
    decoder = msgspec.json.Decoder()
    with open(p, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{p.name}:{lineno}"
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            if not raw.strip():
                stats.blank += 1
                continue
            try:
                raw.decode("utf-8")
                value = decoder.decode(raw)
            except UnicodeDecodeError as e:
                yield where, RowError(f"invalid UTF-8 at byte {e.start}")
                continue
            except msgspec.DecodeError as e:
                yield where, RowError(f"malformed JSON: {e}")
                continue
            yield where, value


def _text(row: dict, key: str) -> str:
    if key not in row:
        raise RowError(f"missing field '{key}'")
    v = row[key]
    if not isinstance(v, str):
        raise RowError(f"field '{key}' must be a string, got {type(v).__name__}")
    if not v.strip():
        raise RowError(f"field '{key}' is empty")
    return v


def _messages(v: Any, key: str) -> list[Message]:
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


def _as_messages(row: dict, key: str, role: str) -> list[Message]:
    v = row.get(key)
    if isinstance(v, list):
        return _messages(v, key)
    return [{"role": role, "content": _text(row, key)}]


@dataclass
class SFTExample:
    messages: list[Message]
    where: str


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


def parse_sft_row(row: Any, where: str) -> SFTExample:
    if not isinstance(row, dict):
        raise RowError(f"expected an object, got {type(row).__name__}")
    if "messages" in row:
        msgs = _messages(row["messages"], "messages")
        if not any(m["role"] == "assistant" for m in msgs) or not any(m["role"] == "user" for m in msgs):
            raise RowError("field 'messages' needs at least one user -> assistant turn")
        if msgs[-1]["role"] != "assistant":
            raise RowError("field 'messages' must end with an assistant message")
        for m in msgs:
            if m["role"] == "assistant" and not m["content"].strip():
                raise RowError("field 'messages' has an empty assistant message")
        return SFTExample(msgs, where)
    if "prompt" in row or "response" in row:
        return SFTExample(_as_messages(row, "prompt", "user") + [{"role": "assistant", "content": _text(row, "response")}], where)
    raise RowError("missing field 'messages' (or 'prompt' and 'response')")


def parse_preference_row(row: Any, where: str) -> PreferenceExample:
    if not isinstance(row, dict):
        raise RowError(f"expected an object, got {type(row).__name__}")
    prompt = _as_messages(row, "prompt", "user")
    chosen = _as_messages(row, "chosen", "assistant")
    rejected = _as_messages(row, "rejected", "assistant")
    if chosen == rejected:
        raise RowError("'chosen' and 'rejected' are identical")
    margin = row.get("margin", 0.0)
    if isinstance(margin, bool) or not isinstance(margin, (int, float)):
        raise RowError(f"field 'margin' must be a number, got {type(margin).__name__}")
    return PreferenceExample(prompt, chosen, rejected, float(margin), where)


def parse_kto_row(row: Any, where: str) -> list[KTOExample]:
    """`{prompt, completion, label}` (label a bool: desirable or not) -> one example; a preference pair
    (`{prompt, chosen, rejected}`) -> two: chosen desirable, rejected undesirable."""
    if not isinstance(row, dict):
        raise RowError(f"expected an object, got {type(row).__name__}")
    if "label" not in row and "chosen" in row:
        p = parse_preference_row(row, where)
        return [KTOExample(p.prompt, p.chosen, True, where), KTOExample(p.prompt, p.rejected, False, where)]
    if not isinstance(row.get("label"), bool):
        raise RowError(f"field 'label' must be true or false, got {row.get('label')!r}" if "label" in row else
                       "missing field 'label' (true: desirable, false: undesirable), or 'chosen' and 'rejected'")
    return [KTOExample(_as_messages(row, "prompt", "user"), _as_messages(row, "completion", "assistant"),
                       row["label"], where)]


def parse_prompt_row(row: Any, where: str) -> PromptExample:
    if isinstance(row, str):
        if not row.strip():
            raise RowError("empty prompt")
        return PromptExample([{"role": "user", "content": row}], where)
    if not isinstance(row, dict):
        raise RowError(f"expected an object with 'prompt' or a string, got {type(row).__name__}")
    return PromptExample(_as_messages(row, "prompt", "user"), where)


PARSERS = {"sft": parse_sft_row, "preference": parse_preference_row, "kto": parse_kto_row,
           "prompt": parse_prompt_row}


def read_dataset(path: str | Path, kind: str, bad_rows: str = "error", max_bad_fraction: float = 0.01) -> tuple[list, ReadStats]:
    """Read and validate a whole JSONL file of `kind` (a key of PARSERS: one parsed row per line)."""
    parse = PARSERS[kind]
    stats = ReadStats()
    rows = []
    for where, value in iter_jsonl(path, stats):
        try:
            if isinstance(value, RowError):
                raise value
            rows.append(parse(value, where))
            stats.rows += 1
        except RowError as e:
            if bad_rows == "error":
                raise DataError(f"{where}: {e}") from None
            stats.skipped += 1
            if len(stats.skipped_examples) < 5:
                stats.skipped_examples.append(f"{where}: {e}")
    total = stats.rows + stats.skipped
    if total == 0:
        raise DataError(f"{Path(path).name}: no rows")
    if stats.skipped:
        log.warning("%s: skipped %d bad rows of %d, e.g. %s", Path(path).name, stats.skipped, total,
                    "; ".join(stats.skipped_examples))
        if stats.skipped / total > max_bad_fraction:
            raise DataError(f"{Path(path).name}: {stats.skipped} of {total} rows are bad, over max_bad_fraction "
                            f"{max_bad_fraction}; e.g. {stats.skipped_examples[0]}")
    return rows, stats


# ---------------------------------------------------------------------------------------
# Formatting: messages -> tokens
# ---------------------------------------------------------------------------------------

_DEFAULT_MARKERS = {"system": "System: ", "user": "User: ", "assistant": "Assistant: "}


def render(tokenizer, messages: list[Message], add_generation_prompt: bool) -> str:
    """Text of a conversation: the tokenizer's chat template, or the default role markers."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    # No template: role markers, one turn per line, each assistant turn closed by eos so the model learns to stop.
    eos = tokenizer.eos_token or ""
    text = tokenizer.bos_token or ""
    for m in messages:
        text += _DEFAULT_MARKERS[m["role"]] + m["content"] + (eos if m["role"] == "assistant" else "") + "\n"
    if add_generation_prompt:
        text += _DEFAULT_MARKERS["assistant"].rstrip()
    return text


@dataclass
class Encoded:
    input_ids: list[int]
    loss_mask: list[int]  # 1 on assistant tokens (incl. end-of-turn), 0 elsewhere
    prompt_len: int  # tokens before the first trained assistant turn


def encode_conversation(tokenizer, messages: list[Message], *, add_generation_prompt: bool = False,
                        train_all_assistant_turns: bool = True) -> Encoded:
    """The one formatting function: a conversation -> token ids and the assistant loss mask.

    Text is split into segments at each assistant turn (prompt part = render(up to turn, generation
    prompt); assistant part = the rest of render(up to and incl. the turn)); each segment is
    tokenized alone, so a prompt always tokenizes the same way whether or not a response follows.
    With add_generation_prompt, the conversation must end before an assistant turn (PPO prompts).
    """
    ids: list[int] = []
    mask: list[int] = []
    seen = ""

    def add(text: str, m: int) -> None:
        toks = tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
        ids.extend(toks)
        mask.extend([m] * len(toks))

    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not train_all_assistant_turns:
        turns = turns[-1:]
    prompt_len = None
    for i in turns:
        head = render(tokenizer, messages[:i], add_generation_prompt=True)
        if not head.startswith(seen):
            raise RowError("the chat template does not render conversations as prefixes of each other")
        add(head[len(seen):], 0)
        if prompt_len is None:
            prompt_len = len(ids)
        full = render(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if not full.startswith(head):
            raise RowError("the chat template's generation prompt is not a prefix of the assistant turn")
        add(full[len(head):], 1)
        seen = full
    if add_generation_prompt:
        tail = render(tokenizer, messages, add_generation_prompt=True)
    elif turns and turns[-1] == len(messages) - 1:
        tail = seen
    else:
        tail = render(tokenizer, messages, add_generation_prompt=False)
    if not tail.startswith(seen):
        raise RowError("the chat template does not render conversations as prefixes of each other")
    add(tail[len(seen):], 0)
    return Encoded(ids, mask, len(ids) if prompt_len is None else prompt_len)


def encode_prompt_response(tokenizer, prompt: list[Message], response: list[Message] | str) -> Encoded:
    """(prompt, response) -> tokens with the loss mask on the response only (SFT pairs, RM pairs)."""
    if isinstance(response, str):
        response = [{"role": "assistant", "content": response}]
    return encode_conversation(tokenizer, prompt + response, train_all_assistant_turns=False)


def encode_prompt(tokenizer, prompt: list[Message]) -> list[int]:
    """PPO prompt tokens: the conversation with the generation prompt appended."""
    return encode_conversation(tokenizer, prompt, add_generation_prompt=True).input_ids


def check_length(n: int, max_length: int, where: str, truncate: bool, stats: ReadStats) -> bool:
    """True if the row must be truncated; raises DataError when over-length and not truncating."""
    if n <= max_length:
        return False
    if not truncate:
        raise DataError(f"{where}: {n} tokens, over max_length {max_length} (set truncate: true to truncate)")
    stats.truncated += 1
    return True


def fit(e: Encoded, max_length: int, where: str, truncate: bool, stats: ReadStats) -> Encoded:
    """`e`, or its first max_length tokens (check_length: an error unless truncating)."""
    if check_length(len(e.input_ids), max_length, where, truncate, stats):
        return Encoded(e.input_ids[:max_length], e.loss_mask[:max_length], min(e.prompt_len, max_length))
    return e


def tokenize_sft(tokenizer, rows: list[SFTExample], max_length: int, truncate: bool, stats: ReadStats) -> list[Encoded]:
    out = []
    for r in rows:
        try:
            e = encode_conversation(tokenizer, r.messages)
        except RowError as err:
            raise DataError(f"{r.where}: {err}") from None
        e = fit(e, max_length, r.where, truncate, stats)
        if sum(e.loss_mask) == 0:
            raise DataError(f"{r.where}: no assistant tokens left after truncation to {max_length}")
        out.append(e)
    return out


def tokenize_preferences(tokenizer, rows: list[PreferenceExample], max_length: int, truncate: bool,
                         stats: ReadStats) -> list[tuple[Encoded, Encoded, float]]:
    out = []
    for r in rows:
        pair = []
        for side in (r.chosen, r.rejected):
            pair.append(fit(encode_prompt_response(tokenizer, r.prompt, side), max_length, r.where, truncate, stats))
        out.append((pair[0], pair[1], r.margin))
    return out


def tokenize_kto(tokenizer, rows: list[KTOExample], max_length: int, truncate: bool,
                 stats: ReadStats) -> list[Encoded]:
    """Each row's prompt + completion, the loss mask on the completion."""
    return [fit(encode_prompt_response(tokenizer, r.prompt, r.completion), max_length, r.where, truncate, stats)
            for r in rows]


def tokenize_prompts(tokenizer, rows: list[PromptExample], max_prompt_len: int, truncate: bool,
                     stats: ReadStats) -> list[list[int]]:
    out = []
    for r in rows:
        ids = encode_prompt(tokenizer, r.prompt)
        if check_length(len(ids), max_prompt_len, r.where, truncate, stats):
            ids = ids[-max_prompt_len:]  # keep the end: the generation prompt must stay
        out.append(ids)
    return out


def pad_right(seqs: list[list[int]], pad_id: int):
    """-> ids (B, T), attention mask (B, T): the batches of every stage, the RM scorer and evaluation."""
    import torch  # here, not at the top: reading and checking data must not need torch

    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


def split_eval(n: int, eval_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Deterministic train/eval index split."""
    import random

    idx = list(range(n))
    random.Random(seed).shuffle(idx)
    k = int(round(n * eval_fraction)) if eval_fraction > 0 else 0
    k = min(k, n - 1)
    return sorted(idx[k:]), sorted(idx[:k])


def check_special_tokens(tokenizer, vocab_rows: int | None = None) -> None:
    """Start-up checks of special tokens that silently break training when wrong."""
    if tokenizer.eos_token_id is None:
        raise DataError("tokenizer: no eos_token; the model could never learn to stop")
    if vocab_rows is not None and len(tokenizer) > vocab_rows:
        raise DataError(f"tokenizer: {len(tokenizer)} tokens but the model's embedding has only {vocab_rows} rows")
    probe = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    enc = encode_conversation(tokenizer, probe)
    bos = tokenizer.bos_token_id
    if bos is not None and len(enc.input_ids) > 1 and enc.input_ids[0] == bos and enc.input_ids[1] == bos:
        raise DataError("tokenizer: the chat template and the tokenizer both add BOS (double BOS)")
    trained = [t for t, m in zip(enc.input_ids, enc.loss_mask) if m]
    if tokenizer.eos_token_id not in trained:
        raise DataError("tokenizer: the end of an assistant turn does not produce eos_token; the model could never learn to stop")
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id == tokenizer.eos_token_id:
        # Safe here: labels come from the assistant mask, never from `ids != pad`. Say so once.
        log.info("tokenizer: pad == eos; masks come from attention masks, so eos stays in the labels")
