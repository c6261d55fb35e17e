"""Bringing your own tokenizer: a tokenizer.json file, pad == eos (Llama, Qwen), no chat template."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from rlhf_dist.data.encode import check_special_tokens, encode_conversation, encode_prompt, render, tokenize_sft
from rlhf_dist.data.rows import ReadStats, SFTExample
from rlhf_dist.models.load import ModelError, last_token_index, load_tokenizer, sequence_scores, token_scalars

CHAT = [{"role": "user", "content": "Describe the cat."}, {"role": "assistant", "content": "It is kind."},
        {"role": "user", "content": "And the dog?"}, {"role": "assistant", "content": "Lovely."}]


def _copy(tiny, dst, edit):
    """Save the tiny tokenizer after `edit(tok)` into dst."""
    tok = load_tokenizer(str(tiny["model"]))
    edit(tok)
    tok.save_pretrained(dst)
    return str(dst)


@pytest.fixture(scope="module", params=["pad_set_to_eos", "no_pad"])
def pad_eos_tok(tiny, tmp_path_factory, request):
    """pad == eos: set so in the files (Qwen style), or no pad at all, which load_tokenizer fills with eos
    (Llama style)."""
    pad = {"pad_set_to_eos": lambda t: setattr(t, "pad_token", t.eos_token),
           "no_pad": lambda t: setattr(t, "pad_token", None)}[request.param]
    path = _copy(tiny, tmp_path_factory.mktemp(request.param), pad)
    tok = load_tokenizer(path)
    assert tok.pad_token_id == tok.eos_token_id is not None
    return tok


# --- tokenizer_path as a tokenizer.json file ---------------------------------------------------------

def test_tokenizer_json_file_takes_special_tokens_and_template_beside_it(tiny, tmp_path):
    ref = load_tokenizer(str(tiny["model"]))
    for name in ("tokenizer_config.json", "chat_template.jinja"):
        if (tiny["model"] / name).is_file():
            shutil.copy(tiny["model"] / name, tmp_path / name)
    shutil.copy(tiny["model"] / "tokenizer.json", tmp_path / "my-tokenizer.json")  # any name: the file given
    tok = load_tokenizer(str(tmp_path / "my-tokenizer.json"))
    assert (tok.eos_token_id, tok.pad_token_id, tok.bos_token_id) == (ref.eos_token_id, ref.pad_token_id,
                                                                      ref.bos_token_id)
    assert tok.chat_template == ref.chat_template and len(tok) == len(ref)
    assert encode_conversation(tok, CHAT) == encode_conversation(ref, CHAT)


def test_tokenizer_json_with_special_tokens_map_only(tiny, tmp_path):
    # The older layout: special_tokens_map.json (AddedToken dicts allowed), no template -> role markers.
    shutil.copy(tiny["model"] / "tokenizer.json", tmp_path / "tokenizer.json")
    eos = {"content": "<|end|>", "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"eos_token": eos, "bos_token": "<|bos|>"}))
    tok = load_tokenizer(str(tmp_path / "tokenizer.json"))
    ref = load_tokenizer(str(tiny["model"]))
    assert tok.eos_token_id == ref.eos_token_id and tok.bos_token_id == ref.bos_token_id
    assert tok.pad_token_id == tok.eos_token_id  # no pad named: padded with eos
    assert not tok.chat_template
    check_special_tokens(tok)


def test_bare_tokenizer_json_is_an_error_naming_the_field(tiny, tmp_path):
    shutil.copy(tiny["model"] / "tokenizer.json", tmp_path / "tokenizer.json")
    with pytest.raises(ModelError, match="tokenizer_path: .*names no eos token.*tokenizer_config.json"):
        load_tokenizer(str(tmp_path / "tokenizer.json"))


# --- pad == eos --------------------------------------------------------------------------------------

def test_pad_eos_sft_labels_keep_eos(pad_eos_tok):
    from rlhf_dist.steps.sft import sft_batch, sft_count

    tok, eos = pad_eos_tok, pad_eos_tok.eos_token_id
    check_special_tokens(tok)  # eos is in the assistant labels
    rows = [SFTExample(CHAT, "a:1"), SFTExample(CHAT[:2], "a:2")]  # different lengths: the short one is padded
    items = tokenize_sft(tok, rows, max_length=64, truncate=False, stats=ReadStats())
    batch = sft_batch(items, tok.pad_token_id)
    for i, e in enumerate(items):
        n = len(e.input_ids)
        ids, mask, attn = batch["input_ids"][i], batch["loss_mask"][i], batch["attention_mask"][i]
        ends = [j for j in range(n) if ids[j] == eos and mask[j]]  # eos closing each assistant turn, trained
        assert len(ends) == sum(m["role"] == "assistant" for m in rows[i].messages) and ends[-1] == n - 1
        assert (ids[n:] == eos).all() and not mask[n:].any() and not attn[n:].any()  # pads: same id, no loss
    assert int(batch["loss_mask"][:, 1:].sum()) == sft_count(items)


def test_pad_eos_reward_read_at_the_last_real_token(tiny, pad_eos_tok):
    from rlhf_dist.data.encode import encode_prompt_response, pad_right
    from rlhf_dist.models.load import load_scalar_model

    tok, eos = pad_eos_tok, pad_eos_tok.eos_token_id
    torch.manual_seed(0)
    model = load_scalar_model(str(tiny["model"]), pad_token_id=tok.pad_token_id).eval()
    prompt = [{"role": "user", "content": "Describe the cat."}]
    seqs = [encode_prompt_response(tok, prompt, r).input_ids for r in ("It is kind and lovely.", "Bad.")]
    ids, attn = pad_right(seqs, tok.pad_token_id)  # (2, T): row 1 ends in eos, then eos padding
    assert all(s[-1] == eos for s in seqs) and (ids[1, len(seqs[1]):] == eos).all()
    assert last_token_index(attn).tolist() == [len(s) - 1 for s in seqs]  # the real eos, not a pad
    with torch.no_grad():
        scores = sequence_scores(model, ids, attn)
        alone = [sequence_scores(model, torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long)) for s in seqs]
        per_token = token_scalars(model, ids, attn)
    assert torch.allclose(scores, torch.cat(alone), atol=1e-5)
    # Searching for the first pad id would read the score before the final eos: a different number.
    assert not torch.isclose(scores[1], per_token[1, len(seqs[1]) - 2], atol=1e-6)


def test_pad_eos_generation_stops_at_eos(tiny, pad_eos_tok):
    from rlhf_dist.models.load import load_causal_lm
    from rlhf_dist.rollout.decode import generate
    from rlhf_dist.steps.forwards import response_logprobs

    tok, eos = pad_eos_tok, pad_eos_tok.eos_token_id
    model = load_causal_lm(str(tiny["model"])).eval()
    # Raise eos so that rows stop at different steps (the random model rarely samples it).
    bias = torch.zeros(model.config.vocab_size)
    bias[eos] = 5.0
    handle = model.lm_head.register_forward_hook(lambda mod, inp, out: out + bias)
    try:
        ps = [encode_prompt(tok, [{"role": "user", "content": t}]) for t in ["Hi", "Describe the cat, please."] * 8]
        s = generate(model, ps, pad_id=tok.pad_token_id, eos_id=eos, max_new_tokens=12,
                     generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            lp = response_logprobs(model, s.sequences, s.attention_mask, s.prompt_len)
    finally:
        handle.remove()
    lengths = s.action_mask.sum(1).tolist()
    assert min(lengths) < 12 and len(set(lengths)) > 1, lengths
    for row, n in zip(s.responses.tolist(), lengths):
        assert eos not in row[: n - 1]  # stops at the first eos ...
        assert n == 12 or row[n - 1] == eos  # ... which is a trained action (in the mask)
        assert row[n:] == [eos] * (len(row) - n)  # then padding, also eos, outside the mask
    assert (s.attention_mask[:, s.prompt_len:] == s.action_mask).all()
    assert ((lp - s.rollout_logprobs).abs() * s.action_mask).max() < 1e-4  # eos pads hidden by the masks


# --- no chat template: the default role markers ------------------------------------------------------

def test_role_markers_without_chat_template(tiny, tmp_path):
    tok = load_tokenizer(_copy(tiny, tmp_path / "tok", lambda t: setattr(t, "chat_template", None)))
    assert not tok.chat_template
    bos, eos = tok.bos_token, tok.eos_token
    assert render(tok, CHAT, add_generation_prompt=False) == (
        f"{bos}User: Describe the cat.\nAssistant: It is kind.{eos}\nUser: And the dog?\nAssistant: Lovely.{eos}\n")
    assert render(tok, CHAT[:1], add_generation_prompt=True) == f"{bos}User: Describe the cat.\nAssistant:"
    e = encode_conversation(tok, CHAT)
    trained = [tok.decode([t]) for t, m in zip(e.input_ids, e.loss_mask) if m]
    assert "".join(trained) == f" It is kind.{eos}\n Lovely.{eos}\n"  # both assistant turns, each with eos
    assert e.input_ids[: e.prompt_len] == encode_prompt(tok, CHAT[:1])  # the PPO prompt is the SFT prefix
    check_special_tokens(tok)
