"""`rlhf-dist init-tiny DIR`: a tiny tokenizer, model and demo data in HF format.

No model hub is reachable on the project's machines, so tests and the quickstart build their own:
a byte-level BPE tokenizer trained on the demo text, with special tokens and a chat template, and a
randomly initialised Llama-architecture model. The loading code that reads them is the same that
reads real checkpoints. Layout: DIR/data/*.jsonl and DIR/model/ (tokenizer + safetensors weights).
"""

from __future__ import annotations

import json
from pathlib import Path

from . import generate_demo_data

PAD, BOS, EOS = "<|pad|>", "<|bos|>", "<|end|>"
ROLE_TOKENS = ["<|user|>", "<|assistant|>", "<|system|>"]
SPECIAL_TOKENS = [PAD, BOS, EOS, *ROLE_TOKENS]  # pad=0, bos=1, eos=2: pad != eos
# BOS once; each message as <|role|>content<|end|>; the generation prompt opens an assistant turn.
# Nothing follows the last message's <|end|>, so the generation prompt is a prefix of the full chat.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}<|end|>"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def _texts(paths) -> list[str]:
    """Every prompt/response string in the demo files (any of the accepted row formats)."""
    texts: list[str] = []
    for path in paths:
        for line in Path(path).read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            if isinstance(row, str):
                texts.append(row)
                continue
            for value in row.values():
                if isinstance(value, str):
                    texts.append(value)
                elif isinstance(value, list):
                    texts.extend(m["content"] for m in value)
    return texts


def build_tokenizer(texts: list[str], vocab_size: int = 512, model_max_length: int = 256):
    """Byte-level BPE trained on `texts`, wrapped as a PreTrainedTokenizerFast with the chat template."""
    from tokenizers import (  # deferred: loading tokenizers takes seconds
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast  # deferred: loading transformers takes seconds

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    # No post-processor: BOS comes from the chat template, once; plain encodes add nothing.
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(texts, trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                  additional_special_tokens=ROLE_TOKENS, model_max_length=model_max_length)
    tok.chat_template = CHAT_TEMPLATE
    return tok


def build_tiny(out_dir, seed: int = 0, vocab_size: int = 512, hidden_size: int = 128, num_layers: int = 4,
               num_heads: int = 4, intermediate_size: int = 256, max_position_embeddings: int = 256,
               extra_texts: tuple[str, ...] = ()) -> dict[str, Path]:
    """Write demo data to out_dir/data and a tokenizer + random Llama to out_dir/model (deterministic).
    `extra_texts` join the demo text for the tokenizer: a larger vocab_size needs more text to reach.

    Returns {"model", "data", "sft", "prefs", "prompts", "eval", "answers"} paths.
    """
    import torch  # deferred: loading torch takes seconds
    from transformers import (  # deferred: loading transformers takes seconds
        GenerationConfig,
        LlamaConfig,
        LlamaForCausalLM,
    )

    out = Path(out_dir)
    data = generate_demo_data(out / "data", seed)
    tok = build_tokenizer(_texts([data[k] for k in ("sft", "prefs", "prompts", "eval")]) + list(extra_texts), vocab_size,
                          model_max_length=max_position_embeddings)
    model_dir = out / "model"
    model_dir.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(model_dir)

    config = LlamaConfig(
        vocab_size=(len(tok) + 7) // 8 * 8,  # a multiple of 8 is friendlier to matmul kernels
        hidden_size=hidden_size, num_hidden_layers=num_layers, num_attention_heads=num_heads,
        num_key_value_heads=num_heads, intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
    # Fork the RNG so building assets does not disturb the caller's torch random state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                               pad_token_id=tok.pad_token_id)
    model.save_pretrained(model_dir, safe_serialization=True)
    return {"model": model_dir, "data": out / "data", **data}
