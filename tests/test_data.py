import json

import pytest

from rlhf_dist.data.encode import (
    check_special_tokens,
    encode_conversation,
    encode_prompt,
    encode_prompt_response,
    tokenize_sft,
)
from rlhf_dist.data.read import read_dataset
from rlhf_dist.data.rows import DataError
from rlhf_dist.models.load import load_tokenizer


@pytest.fixture(scope="module")
def tok(tiny):
    return load_tokenizer(str(tiny["model"]))


def write(tmp_path, name, lines: list, raw: bytes | None = None):
    p = tmp_path / name
    if raw is not None:
        p.write_bytes(raw)
    else:
        p.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return p


def test_missing_rejected_names_file_line_field(tmp_path):
    p = write(tmp_path, "prefs.jsonl", [{"prompt": "a", "chosen": "b", "rejected": "c"}, {"prompt": "a", "chosen": "b"}])
    with pytest.raises(DataError, match=r"prefs.jsonl:2: missing field 'rejected'"):
        read_dataset(p, "preference")


@pytest.mark.parametrize("kind, line, needle", [
    ("preference", '{"prompt": "a", "chosen": "b", "rejec', "malformed JSON"),
    ("preference", '{"prompt": "a", "chosen": "b", "rejected": 3}', "'rejected' must be a string"),
    ("preference", '{"prompt": "", "chosen": "b", "rejected": "c"}', "'prompt' is empty"),
    ("preference", '{"prompt": "a", "chosen": "b", "rejected": "b"}', "identical"),
    ("preference", '{"prompt": "a", "chosen": "b", "rejected": "c", "margin": "x"}', "margin"),
    ("sft", '{"messages": [{"role": "user", "content": "hi"}]}', "user -> assistant"),
    ("sft", '{"prompt": "hi"}', "missing field 'response'"),
    ("sft", '[1, 2]', "expected an object"),
    ("prompt", '""', "empty prompt"),
    ("prompt", '{"text": "x"}', "missing field 'prompt'"),
])
def test_bad_rows_are_errors_with_location(tmp_path, kind, line, needle):
    p = write(tmp_path, "d.jsonl", ['{"prompt": "ok", "response": "fine", "chosen": "a", "rejected": "b"}', line])
    with pytest.raises(DataError) as e:
        read_dataset(p, kind)
    assert "d.jsonl:2:" in str(e.value) and needle in str(e.value)


def test_invalid_utf8_is_an_error(tmp_path):
    p = write(tmp_path, "d.jsonl", [], raw=b'"ok"\n"bad \xff"\n')
    with pytest.raises(DataError, match=r"d.jsonl:2: invalid UTF-8"):
        read_dataset(p, "prompt")


def test_bom_crlf_blank_lines_and_bare_strings(tmp_path):
    p = write(tmp_path, "p.jsonl", [], raw=b'\xef\xbb\xbf{"prompt": "a"}\r\n\r\n"b"\r\n   \n{"prompt": "c"}')
    rows, stats = read_dataset(p, "prompt")
    assert [r.prompt[0]["content"] for r in rows] == ["a", "b", "c"]
    assert stats.blank == 2


def test_skip_mode_counts_and_aborts_past_fraction(tmp_path):
    good = [{"prompt": f"p{i}", "chosen": "a", "rejected": "b"} for i in range(99)]
    p = write(tmp_path, "d.jsonl", good + [{"prompt": "x"}])
    rows, stats = read_dataset(p, "preference", bad_rows="skip", max_bad_fraction=0.05)
    assert len(rows) == 99 and stats.skipped == 1
    with pytest.raises(DataError, match="max_bad_fraction"):
        read_dataset(p, "preference", bad_rows="skip", max_bad_fraction=0.001)


def test_loss_mask_covers_assistant_tokens_and_eos(tok):
    msgs = [{"role": "user", "content": "Describe the cat."}, {"role": "assistant", "content": "The cat is kind."},
            {"role": "user", "content": "And the dog?"}, {"role": "assistant", "content": "The dog is nice."}]
    e = encode_conversation(tok, msgs)
    trained = tok.decode([t for t, m in zip(e.input_ids, e.loss_mask) if m])
    assert trained == "The cat is kind.<|end|>The dog is nice.<|end|>"
    untrained = tok.decode([t for t, m in zip(e.input_ids, e.loss_mask) if not m])
    assert "Describe the cat." in untrained and "kind" not in untrained
    # The same tokens as the whole conversation through the chat template.
    assert e.input_ids == tok(tok.apply_chat_template(msgs, tokenize=False), add_special_tokens=False)["input_ids"]


def test_one_formatting_function_for_sft_rm_and_ppo(tok):
    prompt = [{"role": "user", "content": "How is the park?"}]
    ppo_prompt = encode_prompt(tok, prompt)
    pair = encode_prompt_response(tok, prompt, "The park is calm.")
    assert pair.input_ids[: len(ppo_prompt)] == ppo_prompt and pair.prompt_len == len(ppo_prompt)
    assert pair.input_ids[-1] == tok.eos_token_id


def test_over_length_is_an_error_or_counted_truncation(tmp_path, tok):
    p = write(tmp_path, "s.jsonl", [{"prompt": "hi", "response": "word " * 100}])
    rows, stats = read_dataset(p, "sft")
    with pytest.raises(DataError, match=r"s.jsonl:1: \d+ tokens, over max_length 32"):
        tokenize_sft(tok, rows, 32, truncate=False, stats=stats)
    enc = tokenize_sft(tok, rows, 32, truncate=True, stats=stats)
    assert len(enc[0].input_ids) == 32 and stats.truncated == 1


def test_special_token_checks(tok):
    check_special_tokens(tok, 1024)
    with pytest.raises(DataError, match="embedding"):
        check_special_tokens(tok, 10)
    double = tok.chat_template
    try:
        tok.chat_template = "{{ bos_token }}" + double
        with pytest.raises(DataError, match="double BOS"):
            check_special_tokens(tok)
    finally:
        tok.chat_template = double
