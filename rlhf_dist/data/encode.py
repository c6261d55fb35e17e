"""Formatting: messages -> tokens. `encode_conversation` is the single place where text becomes tokens: SFT
rows, both sides of a preference pair and PPO prompts all pass through it, so what the reward model scores during
PPO looks exactly like what it was trained on. Also the length checks, padding and the train/eval split."""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass

from .rows import DataError, KTOExample, Message, PreferenceExample, PromptExample, ReadStats, RowError, SFTExample

log = logging.getLogger(__name__)

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


def tokenize_rows(tokenizer, kind: str, rows: list, max_length: int, truncate: bool, stats: ReadStats) -> list:
    """Rows of `kind` (a key of layouts.PARSERS) tokenised as their stage does; for prompts, max_length is the
    prompt budget (max_length - gen_max_new_tokens). A KTO row is a list (a pair gives two examples)."""
    if kind == "kto":
        return tokenize_kto(tokenizer, [r for line in rows for r in line], max_length, truncate, stats)
    return {"sft": tokenize_sft, "preference": tokenize_preferences, "prompt": tokenize_prompts}[kind](
        tokenizer, rows, max_length, truncate, stats)


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
