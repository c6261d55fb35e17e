"""Packing: the planning by hand, and packed against padded forwards, losses and gradients (SFT, reward
model, DPO, PPO policy and critic), and the SFT job's loss curve with and without packing."""

from __future__ import annotations

import pytest
import torch

from rlhf_dist.models.packing import first_fit_decreasing, one_row, pack, plan_micro_batches, split_to


def test_first_fit_decreasing_by_hand():
    # longest first: 7 -> bin 0 (room 3), 5 -> bin 1 (room 5), 4 -> bin 1 (room 1), 3 -> bin 0 (room 0), 1 -> bin 1
    assert first_fit_decreasing([3, 7, 4, 5, 1], 10) == [[0, 1], [2, 3, 4]]
    assert first_fit_decreasing([12, 2], 10) == [[0], [1]]  # too long: a bin alone


def test_split_to_halves_the_heaviest_bin_by_tokens():
    lengths = [4, 4, 1, 1, 6]
    assert split_to([[0, 1, 2, 3], [4]], lengths, 3) == [[0], [1, 2, 3], [4]]
    with pytest.raises(ValueError, match="cannot make 6"):
        split_to([[0, 1, 2, 3], [4]], lengths, 6)


def test_plan_reaches_the_count_every_rank_agrees_on():
    lengths = [5, 5, 5, 5]
    assert plan_micro_batches(lengths, 20) == [[0, 1, 2, 3]]
    # another rank needed 3: this one splits to 3 as well
    assert sorted(map(len, plan_micro_batches(lengths, 20, agree=lambda k: max(k, 3)))) == [1, 1, 2]


def test_pack_unpack_round_trip_any_padding_side():
    ids = torch.tensor([[0, 0, 5, 6, 7], [1, 2, 3, 0, 0], [0, 4, 5, 6, 0], [8, 9, 10, 11, 12]])  # (4, 5)
    attn = (ids > 0).long()
    for flat in (False, True):
        p = pack(ids, attn, flat)
        assert p.tokens == int(attn.sum())
        assert torch.equal(p.unpack(p.input_ids), ids * attn)
        if flat:
            assert p.bounds == [0, 3, 6, 9, 14] and p.cu_seqlens.dtype == torch.int32
            assert p.input_ids.shape == (1, 14)  # 3 + 3 + 3 + 5 tokens
        else:
            assert p.input_ids.shape[1] == 5  # rows no longer than the longest sequence
        # every sequence's positions restart at 0, in order
        assert torch.equal(p.unpack(p.position_ids)[1, :3], torch.arange(3))
        assert torch.equal(p.unpack(p.position_ids)[0, 2:], torch.arange(3))


@pytest.fixture(scope="module", params=["varlen", "sdpa", "eager"])
def impl(request) -> str:
    """varlen: what attn_implementation sdpa loads (`attention.VARLEN_SDPA`), one packed row with its
    boundaries; sdpa: transformers' own, which masks one packed row from its position ids; eager: rows
    under a block mask."""
    return request.param


def _kernel(impl: str) -> str:
    from rlhf_dist.models.attention import register

    return register() if impl == "varlen" else impl


@pytest.fixture(scope="module")
def lm(impl):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=64, attn_implementation=_kernel(impl))
    return LlamaForCausalLM(cfg)


@pytest.fixture(scope="module")
def critic(impl):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(1)
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=64, num_labels=1, pad_token_id=0, attn_implementation=_kernel(impl))
    return LlamaForSequenceClassification(cfg)


def _grads(model, loss) -> dict[str, torch.Tensor]:
    model.zero_grad()
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _same(a, b, ga, gb):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert ga.keys() == gb.keys() and ga
    for k in ga:
        torch.testing.assert_close(ga[k], gb[k], rtol=1e-4, atol=1e-6, msg=k)


def _encoded(n: int, seed: int):
    from rlhf_dist.data.encode import Encoded

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        L = int(torch.randint(4, 15, (1,), generator=g))
        p = int(torch.randint(1, L - 1, (1,), generator=g))
        out.append(Encoded(torch.randint(1, 97, (L,), generator=g).tolist(), [0] * p + [1] * (L - p), p))
    return out


@pytest.mark.parametrize("checkpointing", [False, True])
def test_sft_loss_and_gradients_packed_equal_padded(lm, impl, checkpointing):
    """Also with gradient checkpointing: the recomputed forward must see the same sequence boundaries."""
    import copy

    from rlhf_dist.models.load import enable_gradient_checkpointing
    from rlhf_dist.steps.sft import sft_batch, sft_count, sft_loss

    if checkpointing:
        lm = copy.deepcopy(lm).train()
        enable_gradient_checkpointing(lm)
    items = _encoded(6, 0)
    batch = sft_batch(items, pad_id=0)
    norm = float(sft_count(items))
    loss_a, st_a = sft_loss(lm, batch, norm)
    ga = _grads(lm, loss_a)
    packed = pack(batch["input_ids"], batch["attention_mask"], one_row(impl))
    loss_b, st_b = sft_loss(lm, {**batch, "packed": packed}, norm)
    gb = _grads(lm, loss_b)
    _same(loss_a, loss_b, ga, gb)
    assert float(st_a["count"]) == float(st_b["count"]) == norm


def test_reward_and_dpo_packed_equal_padded(lm, critic, impl):
    from rlhf_dist.steps.dpo import DPOPair, dpo_batch, dpo_step_loss
    from rlhf_dist.steps.reward import reward_batch, reward_loss

    enc = _encoded(8, 1)
    pairs = [(enc[i], enc[i + 4], 0.0) for i in range(4)]
    rb = reward_batch(pairs, pad_id=0)
    a, _ = reward_loss(critic, rb, 4.0, 0.01)
    ga = _grads(critic, a)
    b, _ = reward_loss(critic, {**rb, "packed": pack(rb["input_ids"], rb["attention_mask"], one_row(impl))}, 4.0, 0.01)
    _same(a, b, ga, _grads(critic, b))
    db = dpo_batch([DPOPair(c, r, -20.0, -21.0) for c, r, _ in pairs], pad_id=0)
    a, st_a = dpo_step_loss(lm, db, 4.0, 0.1, "sigmoid")
    ga = _grads(lm, a)
    b, st_b = dpo_step_loss(lm, {**db, "packed": pack(db["input_ids"], db["attention_mask"], one_row(impl))}, 4.0, 0.1,
                            "sigmoid")
    _same(a, b, ga, _grads(lm, b))
    torch.testing.assert_close(st_a["logp_chosen"], st_b["logp_chosen"], rtol=1e-5, atol=1e-5)


def _experience(B: int = 5, P: int = 6, R: int = 7):
    """Left-padded prompts of mixed lengths, responses of mixed lengths (right-padded)."""
    from rlhf_dist.steps.records import Experience

    g = torch.Generator().manual_seed(2)
    seq = torch.randint(1, 97, (B, P + R), generator=g)  # (B, P+R)
    attn = torch.ones(B, P + R, dtype=torch.long)
    for b, (pad, resp) in enumerate([(3, 7), (0, 2), (1, 5), (5, 1), (2, 7)][:B]):
        attn[b, :pad] = 0
        attn[b, P + resp:] = 0
    seq = seq * attn
    action = attn[:, P:]  # (B, R)
    r = lambda: torch.randn(B, R, generator=g) * action  # noqa: E731
    return Experience(sequences=seq, attention_mask=attn, action_mask=action, prompt_len=P,
                      old_logprobs=-3 + 0.1 * r(), ref_logprobs=-3 + 0.1 * r(), values=r(), scores=torch.zeros(B),
                      kl=r(), rewards=r(), advantages=r(), returns=r(), sample_ids=list(range(B)), version=0)


@pytest.mark.parametrize("entropy_coef,agg", [(0.0, "token_mean"), (0.01, "seq_mean_token_mean")])
def test_ppo_policy_and_value_losses_packed_equal_padded(lm, critic, impl, entropy_coef, agg):
    from rlhf_dist.steps.update import policy_loss, value_loss

    mb = _experience()
    kw = dict(clip_range=0.2, entropy_coef=entropy_coef, temperature=0.7, agg=agg, kl_coef=0.05)
    a, st_a = policy_loss(lm, mb, **kw)
    ga = _grads(lm, a)
    b, st_b = policy_loss(lm, mb, **kw, packed=pack(mb.sequences, mb.attention_mask, one_row(impl)))
    _same(a, b, ga, _grads(lm, b))
    torch.testing.assert_close(st_a["ratio_dev_max"], st_b["ratio_dev_max"], rtol=1e-4, atol=1e-5)
    a, _ = value_loss(critic, mb, clip_range=0.2)
    ga = _grads(critic, a)
    b, _ = value_loss(critic, mb, clip_range=0.2, packed=pack(mb.sequences, mb.attention_mask, one_row(impl)))
    _same(a, b, ga, _grads(critic, b))


def test_sft_job_loss_curve_packed_equals_padded(tiny, tmp_path, gloo_group):
    """The SFT job's own step (`train_step` over `micro_batches`, DeepSpeed ZeRO-2, one rank): four optimizer
    steps padded in micro-batches of 4 against packed in micro-batches of at most 200 tokens."""
    import random

    from conftest import base_config

    from rlhf_dist.config import load_config
    from rlhf_dist.offline.loop import train_step
    from rlhf_dist.offline.task import build_task, micro_batches
    from rlhf_dist.runtime.distributed import make_engine

    curves, counts = {}, {}
    for budget in (None, 200):
        cfg = load_config(base_config(tiny, tmp_path, zero_stage=2, sft_batch_size=16,
                                      sft_micro_batch_size=None if budget else 4, sft_max_tokens_per_micro_batch=budget))
        torch.manual_seed(0)
        task = build_task(cfg, "sft", world=1)
        engine = make_engine(task.model, lr=2e-3, total_steps=4, warmup_steps=0, micro_batch=4, grad_accum=4,
                             zero_stage=2, grad_clip=1.0, bf16=False)
        order = list(range(len(task.train)))
        random.Random(0).shuffle(order)
        losses, n = [], []
        for s in range(4):
            items = [task.train[i] for i in order[s * 16:(s + 1) * 16]]
            micros = micro_batches(task, items)
            sums, _ = train_step(task, engine, micros, float(task.count(items)), False, lambda b: b)
            losses.append(float(sums["loss_sum"] / sums["count"]))
            n.append(len(micros))
        curves[budget], counts[budget] = losses, n
    assert counts[None] == [4, 4, 4, 4] and counts[200] != counts[None]  # the packed steps differ in shape
    torch.testing.assert_close(torch.tensor(curves[200]), torch.tensor(curves[None]), rtol=1e-4, atol=1e-5)
    assert curves[None][-1] < curves[None][0]


def test_no_grad_forwards_packed_by_tokens_equal_padded(lm, critic, impl):
    """The experience forwards (reference and old logprobs, values, reward scores) in chunks of at most
    20 real tokens, each packed, against one padded pass; outputs come back in row order."""
    import msgspec

    from rlhf_dist.config import RLHFConfig
    from rlhf_dist.models.load import sequence_scores
    from rlhf_dist.steps.forwards import forward_chunks, response_logprobs, response_values

    mb = _experience()
    seq, attn, P = mb.sequences, mb.attention_mask, mb.prompt_len
    cfg = msgspec.convert({"model_name": "x", "ppo_max_tokens_per_micro_batch": 20,
                           "attn_implementation": "eager" if impl == "eager" else "sdpa"}, RLHFConfig)
    seen = []
    with torch.no_grad():
        for fn in (lambda s, a, p: response_logprobs(lm, s, a, P, 1.0, p),  # (b, R)
                   lambda s, a, p: response_values(critic, s, a, P, p),  # (b, R)
                   lambda s, a, p: sequence_scores(critic, s, a, p)):  # (b,)
            chunked = forward_chunks(lambda s, a, p: (seen.append(p.tokens), fn(s, a, p))[1], cfg, seq, attn)
            whole = fn(seq, attn, None)
            keep = mb.action_mask.bool() if whole.dim() == 2 else torch.ones_like(whole, dtype=torch.bool)
            torch.testing.assert_close(chunked[keep], whole[keep], atol=1e-5, rtol=1e-5)  # past a response: unused
    assert max(seen) <= 20 and len(seen) > 3


def _stand_in(signature: list[str], calls: list):
    """A CPU stand-in of torch's flash varlen kernel (which needs a GPU) with the keyword arguments `signature`
    of one torch release: it checks what it is given, appends the query's shape to `calls`, and computes each
    sequence alone."""
    import inspect

    def stand_in(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, **kw):  # (T, H, D) each
        gqa = kw.pop("enable_gqa", False)
        assert kw == ({"window_size": (-1, 0)} if "window_size" in signature else {"is_causal": True})
        assert (q.shape[1] != k.shape[1]) == gqa  # grouped heads only where the kernel takes enable_gqa
        assert cu_q.dtype == torch.int32 and max_q == max(cu_q.diff().tolist())
        calls.append(tuple(q.shape))
        b = cu_q.tolist()
        return torch.cat([torch.nn.functional.scaled_dot_product_attention(
            q[s:e].transpose(0, 1), k[s:e].transpose(0, 1), v[s:e].transpose(0, 1), is_causal=True,
            scale=scale, enable_gqa=gqa).transpose(0, 1) for s, e in zip(b[:-1], b[1:])])

    params = ["query", "key", "value", "cu_seq_q", "cu_seq_k", "max_q", "max_k", "scale", *signature]
    stand_in.__signature__ = inspect.Signature([inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD)
                                                for n in params])
    return stand_in


@pytest.fixture(params=["is_causal", "window_size+enable_gqa"])  # torch 2.9-2.10's signature; 2.13's
def cpu_kernel(request, monkeypatch):
    """The flash branch of `attention.varlen_sdpa` on the CPU: the kernel replaced by `_stand_in`, float32 on
    the CPU eligible for it, no verdict of `check_flash` yet. Yields the stand-in's calls."""
    from rlhf_dist.models import attention

    calls: list = []
    monkeypatch.setattr(attention, "varlen_attn", _stand_in(request.param.split("+"), calls))
    monkeypatch.setattr(attention, "_flash_eligible", lambda device, dtype: True)
    monkeypatch.setattr(attention, "_FLASH_OK", {})
    attention._varlen_params.cache_clear()
    yield calls
    attention._varlen_params.cache_clear()


def _ragged_row():
    """Three sequences of 6, 9 and 3 tokens, padded (3, 9) and packed in one row."""
    ids = torch.randint(1, 97, (3, 9), generator=torch.Generator().manual_seed(3))
    attn = torch.ones(3, 9, dtype=torch.long)
    attn[0, 6:] = 0
    attn[2, 3:] = 0
    return ids, attn, pack(ids, attn)


def test_the_cuda_varlen_call_on_a_cpu_stand_in(cpu_kernel):
    """The flash branch, with the causal flag of either torch signature and grouped-query heads, gives the
    output of the gathered path; its check passes."""
    from rlhf_dist.models import attention

    _, _, p = _ragged_row()
    kw = dict(cu_seq_lens_q=p.cu_seqlens, max_length_q=max(p.cu_seqlens.diff().tolist()))  # no layout: built here
    g = torch.Generator().manual_seed(4)
    T = p.bounds[-1]  # 6 + 9 + 3 tokens
    q, k, v = (torch.randn(1, h, T, 8, generator=g) for h in (4, 2, 2))  # (1, H, T, D): 2 query heads per kv head
    want, _ = attention.varlen_sdpa(None, q, k, v, None, scaling=0.3, **kw)  # not checked yet: the gathered path
    assert cpu_kernel == []
    attention.check_flash(torch.device("cpu"), torch.float32)
    assert attention._FLASH_OK == {(torch.device("cpu"), torch.float32): True} and len(cpu_kernel) == 1
    got, _ = attention.varlen_sdpa(None, q, k, v, None, scaling=0.3, **kw)
    assert len(cpu_kernel) == 2
    torch.testing.assert_close(got, want)


def _varlen_lm():
    """A 2-layer Llama with grouped-query heads on `attention.VARLEN_SDPA`, in eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, intermediate_size=64,
                                        attn_implementation=_kernel("varlen"))).eval()


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_the_flash_check_runs_once_before_a_no_grad_packed_forward(cpu_kernel, monkeypatch, mode):
    """The reference, reward, old-logprob and value forwards run without autograd. The kernel's check (which
    runs a backward) must still pass there: once per process, before the first packed forward, not inside it."""
    from rlhf_dist.models import attention
    from rlhf_dist.models.packing import forward

    lm = _varlen_lm()
    depth, checked_at = [0], []  # forwards of `lm` under way; that count at each check
    lm.register_forward_pre_hook(lambda *a: depth.__setitem__(0, depth[0] + 1))
    lm.register_forward_hook(lambda *a: depth.__setitem__(0, depth[0] - 1))
    works = attention._flash_works
    monkeypatch.setattr(attention, "_flash_works", lambda *a: checked_at.append(depth[0]) or works(*a))
    ids, attn, p = _ragged_row()
    with mode():
        got = [p.unpack(forward(lm, ids, attn, p).logits) for _ in range(2)]  # (3, 9, V) each
        want = lm(input_ids=ids, attention_mask=attn).logits  # (3, 9, V)
    assert checked_at == [0]  # one check, outside any forward
    assert attention._FLASH_OK == {(torch.device("cpu"), torch.float32): True}
    assert len(cpu_kernel) == 1 + 2 * 2  # the check, then both layers of both packed forwards took the kernel
    for x in got:
        torch.testing.assert_close(x[attn.bool()], want[attn.bool()], rtol=1e-4, atol=1e-5)


def test_a_packed_forward_builds_its_layout_once(monkeypatch):
    """The gathered path's layout is built by `pack` on the host; every layer of the forward reuses it (a
    layout built per layer copied two host lists to the device in each, a stream sync each)."""
    from rlhf_dist.models import attention
    from rlhf_dist.models.packing import forward

    lm = _varlen_lm()
    ids, attn, p = _ragged_row()
    built, used = [], []
    layout, gathered = attention.seq_layout, attention._gathered
    monkeypatch.setattr(attention, "seq_layout", lambda bounds: built.append(bounds) or layout(bounds))
    monkeypatch.setattr(attention, "_gathered", lambda q, k, v, g, s, scale: used.append((g, s)) or gathered(
        q, k, v, g, s, scale))
    with torch.no_grad():
        forward(lm, ids, attn, p)
    assert built == [] and len(used) == 2  # two layers, no layout built during the forward
    assert all(g is p.layout[0] and s is p.layout[1] for g, s in used)


def test_a_varlen_kernel_that_fails_its_check_is_not_used(caplog):
    """torch's real kernel has no CPU implementation: the check fails, says so, and packed rows keep the
    gathered-sdpa path."""
    from rlhf_dist.models import attention

    if attention.varlen_attn is None:
        pytest.skip("this torch has no varlen_attn")
    with caplog.at_level("WARNING"):
        assert not attention._flash_works(torch.device("cpu"), torch.bfloat16)
    assert "failed its check" in caplog.text
