"""`rlhf-dist init-tiny DIR`: a tiny tokenizer, model and demo data in HF format.

No model hub is reachable on the project's machines, so tests and the quickstart build their own:
a byte-level BPE tokenizer trained on the demo text, with special tokens and a chat template, and a
randomly initialised Llama-architecture model. The loading code that reads them is the same that
reads real checkpoints.
"""

from __future__ import annotations

import json
from pathlib import Path

from .demo import generate_demo_data

SPECIAL = ["<|pad|>", "<|bos|>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>"]
# BOS once, each message as <|role|>content<|end|>; the generation prompt opens an assistant turn.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def _corpus(data_files) -> list[str]:
    texts = []
    for path in data_files:
        for line in Path(path).read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            if isinstance(row, str):
                texts.append(row)
                continue
            for v in row.values():
                if isinstance(v, str):
                    texts.append(v)
                elif isinstance(v, list):
                    texts.extend(m["content"] for m in v)
    return texts


def build_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|end|>",
                                   pad_token="<|pad|>", additional_special_tokens=SPECIAL[3:])
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny(out_dir, seed: int = 0, vocab_size: int = 512, hidden_size: int = 128, num_layers: int = 4,
               num_heads: int = 4, intermediate_size: int = 256, max_position_embeddings: int = 256) -> dict[str, Path]:
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    out = Path(out_dir)
    data = generate_demo_data(out / "data", seed)
    tok = build_tokenizer(_corpus([data["sft"], data["prefs"]]), vocab_size)
    model_dir = out / "model"
    model_dir.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(model_dir)
    vocab = (len(tok) + 7) // 8 * 8
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden_size, num_hidden_layers=num_layers,
                         num_attention_heads=num_heads, num_key_value_heads=num_heads,
                         intermediate_size=intermediate_size, max_position_embeddings=max_position_embeddings,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                         tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                               pad_token_id=tok.pad_token_id)
    model.save_pretrained(model_dir, safe_serialization=True)
    return {"model": model_dir, "data": out / "data", **data}
