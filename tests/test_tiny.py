"""The bundled demo task and the tiny HF assets (CPU, no Ray)."""

from __future__ import annotations

import json

import pytest

from rlhf_dist.demo import gold_score, is_positive, positivity_reward
from rlhf_dist.demo.tiny import build_tiny

DATA_FILES = ("sft", "prefs", "prompts", "eval")


def _rows(path) -> list:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _prompt_of(row) -> str:
    return row if isinstance(row, str) else row["prompt"]


def _sft_pair(row) -> tuple[str, str]:
    if "messages" in row:
        user, assistant = row["messages"]
        assert (user["role"], assistant["role"]) == ("user", "assistant")
        return user["content"], assistant["content"]
    return row["prompt"], row["response"]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return build_tiny(tmp_path_factory.mktemp("tiny_a"), seed=0)


@pytest.fixture(scope="module")
def tok(built):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(built["model"])


# --- gold metric -------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, score", [
    ("The cat is wonderful and kind.", 1.0),
    ("THE CAT IS LOVELY!", 1.0),
    ("The cat is terrible and rude.", -1.0),
    ("The cat is great but awful.", 0.0),
    ("The cat sat on the mat.", 0.0),
    ("", 0.0),
    ("The school is new.", 0.0),          # "cold" must not match inside "school": word boundaries
    ("Goodness, kindness.", 0.0),         # nor "good"/"kind" inside longer words
    ("Kind, kind and sad.", 1 / 3),
])
def test_gold_score(text, score):
    assert gold_score(text) == pytest.approx(score)
    assert is_positive(text) == (score > 0)


def test_positivity_reward():
    rewards = positivity_reward(["a", "b", "c"], ["It is great.", "It is bad.", "It is."])
    assert rewards == [1.0, -1.0, 0.0] and all(type(r) is float for r in rewards)
    with pytest.raises(ValueError):
        positivity_reward(["a"], ["x", "y"])


# --- demo data ---------------------------------------------------------------------------------------

def test_data_files_and_formats(built):
    sft, prefs, prompts, evals = (_rows(built[k]) for k in DATA_FILES)
    assert built["data"].is_dir() and all(built[k].parent == built["data"] for k in DATA_FILES)
    assert (len(sft), len(prefs), len(prompts), len(evals)) == (1200, 1200, 400, 100)

    n_messages = sum("messages" in r for r in sft)
    assert 0.65 < n_messages / len(sft) < 0.85  # ~25% prompt/response rows
    for row in sft:
        prompt, response = _sft_pair(row)
        assert prompt and 5 <= len(response.split()) <= 12

    assert 0.1 < sum("margin" in r for r in prefs) / len(prefs) < 0.3
    assert all(set(r) <= {"prompt", "chosen", "rejected", "margin"} for r in prefs)

    n_bare = sum(isinstance(r, str) for r in prompts)
    assert 0.03 < n_bare / len(prompts) < 0.2
    assert all(isinstance(r, str) or set(r) == {"prompt"} for r in prompts)
    assert all(set(r) == {"prompt", "response"} for r in evals)


def test_sft_is_balanced(built):
    responses = [_sft_pair(r)[1] for r in _rows(built["sft"])]
    assert all(gold_score(r) in (-1.0, 1.0) for r in responses)
    assert 0.4 <= sum(map(is_positive, responses)) / len(responses) <= 0.6


def test_prefs_prefer_positive(built):
    for row in _rows(built["prefs"]):
        assert row["chosen"] != row["rejected"]
        assert gold_score(row["chosen"]) > gold_score(row["rejected"])


def test_eval_held_out(built):
    evals = _rows(built["eval"])
    ppo = {_prompt_of(r) for r in _rows(built["prompts"])}
    assert not {r["prompt"] for r in evals} & ppo
    assert all(gold_score(r["response"]) == 1.0 for r in evals)


def test_deterministic(built, tmp_path):
    from safetensors.torch import load_file

    again = build_tiny(tmp_path, seed=0)
    for key in DATA_FILES:
        assert again[key].read_bytes() == built[key].read_bytes(), key
    assert (again["model"] / "tokenizer.json").read_bytes() == (built["model"] / "tokenizer.json").read_bytes()
    w1, w2 = load_file(built["model"] / "model.safetensors"), load_file(again["model"] / "model.safetensors")
    assert w1.keys() == w2.keys() and all(w1[k].equal(w2[k]) for k in w1)
    # Idempotent in place: building over an existing directory gives the same files.
    before = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    build_tiny(tmp_path, seed=0)
    after = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert before == after
    # A different seed really changes the data.
    other = build_tiny(tmp_path / "other", seed=1)
    assert other["sft"].read_bytes() != built["sft"].read_bytes()


def test_no_pickles_written(built):
    names = {p.name for p in built["model"].iterdir()}
    assert "model.safetensors" in names and "tokenizer.json" in names and "config.json" in names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt"))]


# --- model and tokenizer ---------------------------------------------------------------------------

def test_model_loads_and_runs(built, tok):
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    model = AutoModelForCausalLM.from_pretrained(built["model"], use_safetensors=True).eval()
    assert model.config.vocab_size >= len(tok) and model.config.vocab_size % 8 == 0
    assert not model.config.tie_word_embeddings
    ids = tok.apply_chat_template([{"role": "user", "content": "Describe the cat."}], add_generation_prompt=True,
                                  tokenize=True, return_dict=True, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], model.config.vocab_size) and torch.isfinite(logits).all()
    gen = GenerationConfig.from_pretrained(built["model"])
    assert (gen.bos_token_id, gen.eos_token_id, gen.pad_token_id) == (tok.bos_token_id, tok.eos_token_id,
                                                                       tok.pad_token_id)


def test_special_tokens(tok):
    assert tok.pad_token == "<|pad|>" and tok.bos_token == "<|bos|>" and tok.eos_token == "<|end|>"
    assert len({tok.pad_token_id, tok.bos_token_id, tok.eos_token_id}) == 3  # in particular pad != eos
    assert tok.padding_side == "right"
    for t in ("<|user|>", "<|assistant|>", "<|system|>"):
        assert tok.convert_tokens_to_ids(t) != tok.unk_token_id and len(tok(t, add_special_tokens=False).input_ids) == 1
    # No post-processor: a plain encode adds nothing, with or without add_special_tokens.
    text = "The cat is wonderful."
    plain = tok(text, add_special_tokens=False).input_ids
    assert tok(text).input_ids == plain
    assert tok.decode(plain) == text
    assert not {tok.bos_token_id, tok.eos_token_id, tok.pad_token_id} & set(plain)


def _demo_conversations(built, n=20):
    convs = [[{"role": "user", "content": p}, {"role": "assistant", "content": r}]
             for p, r in (_sft_pair(row) for row in _rows(built["sft"])[:n])]
    convs += [[{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["chosen"]}]
              for r in _rows(built["prefs"])[:n]]
    convs.append([{"role": "system", "content": "Be nice."}, {"role": "user", "content": "Describe the dog."},
                  {"role": "assistant", "content": "The dog is kind."}])
    return convs


def test_chat_template_prefix_property(built, tok):
    for conv in _demo_conversations(built):
        prompt = tok.apply_chat_template(conv[:-1], add_generation_prompt=True, tokenize=False)
        full = tok.apply_chat_template(conv, tokenize=False)
        assert full.startswith(prompt)
        assert full == prompt + conv[-1]["content"] + "<|end|>"
        p_ids = tok(prompt, add_special_tokens=False).input_ids
        f_ids = tok(full, add_special_tokens=False).input_ids
        assert f_ids[:len(p_ids)] == p_ids
        # BOS exactly once, first; the assistant turn (and the conversation) ends with eos.
        assert f_ids.count(tok.bos_token_id) == 1 and f_ids[0] == tok.bos_token_id
        assert f_ids[-1] == tok.eos_token_id
        assert p_ids[-1] == tok.convert_tokens_to_ids("<|assistant|>")
        assert f_ids.count(tok.eos_token_id) == len(conv)
        # Tokenizing through the template gives the same ids as tokenizing the rendered text.
        templ = tok.apply_chat_template(conv, tokenize=True, return_dict=True)["input_ids"]
        assert list(templ) == f_ids
