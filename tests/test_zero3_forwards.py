"""ZeRO-3's parameter prefetch: DeepSpeed records the order in which a step's forward and backward fetch
each module's parameters, then prefetches along that trace. A step begins in the root module's forward
pre-hook, so every forward of a ZeRO-3 model must go through the root for the trace to become valid."""

import pytest
import torch

from rlhf_dist.models.load import apply_lora, load_scalar_model, load_tokenizer, token_scalars
from rlhf_dist.models.packing import pack
from rlhf_dist.runtime.distributed import make_engine


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_zero3_critic_forwards_complete_the_prefetch_trace(tiny, gloo_group, packed, lora):
    """The critic's and the reward model's forwards (`token_scalars`), padded and packed, with and without a
    LoRA wrapper as the root: after two steps the trace is complete."""
    path = str(tiny["model"])
    model = load_scalar_model(path, pad_token_id=load_tokenizer(path).pad_token_id)
    if lora:
        model = apply_lora(model, 4, 8.0, 0.0, "all-linear", ["score"])
    engine = make_engine(model, lr=1e-3, total_steps=3, warmup_steps=0, micro_batch=2, grad_accum=1, zero_stage=3,
                         grad_clip=1.0, bf16=False, constant_lr=True)
    trace = engine.optimizer.parameter_offload.get_param_coordinator()
    ids = torch.randint(3, model.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(0))  # (B, T)
    attn = torch.ones_like(ids)
    attn[1, :3] = 0  # left padding on one row
    p = pack(ids, attn) if packed else None
    for _ in range(3):
        values = token_scalars(engine.module, ids, attn, p)  # (B, T)
        engine.backward((values * attn).pow(2).mean())
        engine.step()
    assert trace.is_complete_trace()
