"""The learner role: a DeepSpeed engine for the policy or the critic, its update, saves and weight sends."""

from __future__ import annotations

import datetime

import torch
import torch.distributed as dist

from ..algo import kl_placement, loss_units
from ..config.stages import ONLINE, micro_batch_size
from ..models.load import (
    adapters_off,
    apply_lora,
    enable_gradient_checkpointing,
    load_causal_lm,
    load_lora,
    load_scalar_model,
    load_tokenizer,
    merged_weights,
    save_hf,
)
from ..models.packing import micro_batch_indices, one_row, pack
from ..runtime.distributed import (
    accumulate,
    all_reduce_max,
    all_reduce_sum,
    full_state_dict,
    init_local_group_env,
    make_engine,
)
from ..steps import update  # the module, not its functions: a fault plan (tests/faults.py) patches them there
from ..steps.forwards import forward_chunks, response_logprobs, response_values
from ..steps.records import Experience
from .actors import RoleWorker
from .calls import wait
from .weight_sync import Broadcast, WeightSender, param_signature


class Learner(RoleWorker):
    """A DeepSpeed engine for the policy (kind="policy") or the critic (kind="critic")."""

    def __init__(self, kind: str, rank: int, world: int, config: dict, num_cpus: float, device: str):
        super().__init__(kind, rank, config, num_cpus, device)
        self.kind, self.world = kind, world
        self.engine = None

    def setup(self, addr: str, port: int, model_dir: str, total_steps: int, adapter_dir: str | None = None) -> dict:
        """`adapter_dir`: with lora_rank > 0, trained adapters (a resumed iteration's) to put on `model_dir`."""
        init_local_group_env(self.rank, self.world, addr, port)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo", rank=self.rank,
                                    world_size=self.world, timeout=datetime.timedelta(seconds=self.cfg.call_timeout_s))
        c = self.cfg
        if self.kind == "policy":
            model = load_causal_lm(model_dir, self.bf16, c.attn_implementation)
            lr = c.ppo_lr_policy
        else:
            tok = load_tokenizer(model_dir)
            model = load_scalar_model(model_dir, self.bf16, tok.pad_token_id, c.attn_implementation)
            lr = c.ppo_lr_value
        if c.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        if c.lora_rank:  # the critic's score head (new, or the reward model's) trains in full
            model = load_lora(model, adapter_dir) if adapter_dir else apply_lora(
                model, c.lora_rank, c.lora_alpha, c.lora_dropout, c.lora_target_modules,
                None if self.kind == "policy" else ["score"])
        self.micro = micro = micro_batch_size(c, ONLINE, self.world)
        self.accum = c.ppo_mini_batch_size // (micro * self.world)
        self.engine = make_engine(model, lr=lr, total_steps=total_steps, warmup_steps=0, micro_batch=micro,
                                  grad_accum=self.accum, zero_stage=c.zero_stage, grad_clip=c.ppo_max_grad_norm,
                                  bf16=self.bf16, constant_lr=True, offload_optimizer=c.offload_optimizer)
        return {"params": sum(p.numel() for p in model.parameters())}

    def sync_params(self, merge: bool = False):
        """(name, tensor) of what the rollout's plain model receives: the parameters, or with LoRA the
        weights merged under the base model's names (merge=False: the base weights, for names and shapes)."""
        if self.cfg.lora_rank:
            return merged_weights(self.engine.module, merge=merge)
        return self.engine.module.named_parameters()

    def signature(self) -> list:
        return param_signature(self.sync_params())

    def join_sync(self, addr: str, port: int, world: int, backend: str, ipc_receivers: list) -> None:
        """Every policy rank gets a sender (ZeRO-3 gathers are collectives); rank 0 also sends: by CUDA IPC
        to `ipc_receivers` (rollout actors on its GPU) and as rank 0 of the broadcast group when `world` > 1."""
        merged = (lambda: (t for _, t in self.sync_params(merge=True))) if self.cfg.lora_rank else None
        self.sender = WeightSender(self.sync_params(), self.rank, self.engine.zero_optimization_stage() == 3,
                                   tensors=merged)
        self.ipc_receivers = ipc_receivers if self.rank == 0 else []
        self.group = (Broadcast(addr, port, 0, world, backend, self.cfg.sync_timeout_s)
                      if self.rank == 0 and world > 1 else None)

    @torch.no_grad()
    def forward(self, samples) -> torch.Tensor:
        """Old logprobs (policy) or values (critic) for a slice of the batch: (b, R)."""
        def one(seq, attn, packed):  # (b, P+R) -> (b, R)
            d = self.engine.device
            s, a, p = seq.to(d), attn.to(d), packed and packed.to(d)
            if self.kind == "policy":
                return response_logprobs(self.engine.module, s, a, samples.prompt_len, self.cfg.gen_temperature,
                                         p).float()
            return response_values(self.engine.module, s, a, samples.prompt_len, p).float()

        self.engine.eval()
        out = forward_chunks(one, self.cfg, samples.sequences, samples.attention_mask,
                             lambda k: int(all_reduce_max([float(k)])[0]))  # (B, R)
        self.engine.train()
        return out

    def reference_logprobs(self, samples) -> torch.Tensor:
        """The reference's logprobs (b, R) with lora_rank > 0: the policy's own base weights, adapters off
        (so no reference actor holds a second copy of the model)."""
        with adapters_off(self.engine.module):
            return self.forward(samples)

    def train(self, exp, seed: int, kl_coef: float = 0.0) -> dict:
        """ppo_epochs x mini-batches over the experience; this rank takes its share of each mini-batch, in
        micro-batches (`micro_batches`), then one optimizer step per mini-batch. `kl_coef`: the KL coefficient,
        which enters the policy loss only where `kl_placement` puts it (kl_in: loss)."""
        c = self.cfg
        # Stats stay 0-dim device tensors through the micro-batch loop and are read once at the end, so
        # the loop adds no host synchronisation of its own.
        acc = _StepStats()
        skipped_before = self.engine.skipped_steps
        for j, idx in enumerate(update.minibatches(len(exp), c.ppo_mini_batch_size, c.ppo_epochs, seed)):
            mb = exp.select(idx)
            per_rank = len(idx) // self.world
            mine = mb.select(list(range(self.rank * per_rank, (self.rank + 1) * per_rank)))
            micros = self.micro_batches(mine)
            for i in accumulate(self.engine, len(micros)):
                loss, st, micro = self.micro_loss(mine.select(micros[i]), mb.action_mask, kl_coef)
                # A non-finite loss gives non-finite gradients; DeepSpeed's ZeRO-1/2 optimizer then skips
                # the whole optimizer step (counted in engine.skipped_steps), so no NaN reaches the weights.
                acc.add(st, ~torch.isfinite(loss.detach()), micro.sample_ids, first=j == 0)
                self.engine.backward(loss, scale_wrt_gas=False)
            gn = self.engine.get_global_grad_norm()
            acc.grad_norm += float(gn) if gn is not None else 0.0
            acc.minibatches += 1
        out = acc.read(self.world)
        out["skipped_steps"] = self.engine.skipped_steps - skipped_before
        out["params_finite"] = self.params_finite()
        if self.kind == "policy":
            self.version += 1
            out["version"] = self.version
        return out

    def micro_batches(self, mine) -> list[list[int]]:
        """This rank's share of a mini-batch -> micro-batches (indices): of ppo_micro_batch_size samples, or
        packed by tokens (ppo_max_tokens_per_micro_batch), as many on every rank (`plan_micro_batches`)."""
        lengths = mine.attention_mask.sum(1).tolist()  # (b,) real tokens, on the host already
        return micro_batch_indices(lengths, self.micro, self.cfg.ppo_max_tokens_per_micro_batch,
                                   lambda k: int(all_reduce_max([float(k)])[0]))

    def micro_loss(self, micro, mb_action_mask: torch.Tensor, kl_coef: float):
        """The policy or value loss of one micro-batch, as its share of the mini-batch's (whose action mask
        gives the units the loss averages over), scaled by the ranks DeepSpeed averages over."""
        c = self.cfg
        packed = None
        if c.ppo_max_tokens_per_micro_batch is not None:  # laid out on the host, before the copy to the device
            packed = pack(micro.sequences, micro.attention_mask, one_row(c.attn_implementation))
            packed = packed.to(self.engine.device)
        micro = _to_device(micro, self.engine.device)
        if self.kind == "policy":
            units = float(loss_units(mb_action_mask, c.loss_agg))  # what the policy loss averages over
            place = kl_placement(c.kl_in, kl_coef, c.kl_estimator)
            loss, st = update.policy_loss(self.engine.module, micro, clip_range=c.ppo_clip_range,
                                          entropy_coef=c.ppo_entropy_coef, temperature=c.gen_temperature, agg=c.loss_agg,
                                          units=units, scale=self.world, kl_coef=place.loss_coef,
                                          kl_estimator=place.estimator, packed=packed)
        else:
            loss, st = update.value_loss(self.engine.module, micro, clip_range=c.ppo_value_clip_range,
                                         units=float(mb_action_mask.sum()), scale=self.world, packed=packed)
        return loss, st, micro

    def params_finite(self) -> bool:
        """Every parameter finite, on every rank. Under ZeRO-3 each rank checks its own partition
        (`ds_tensor`), so together they check every element. One host sync."""
        parts = [getattr(p, "ds_tensor", p) for p in self.engine.module.parameters()]
        bad = torch.stack([(~torch.isfinite(t)).any() for t in parts if t.numel()]).any()
        return all_reduce_sum([float(bad)])[0] == 0

    def save_state(self, out_dir: str) -> None:
        """Optimizer and scheduler state for an exact resume (DeepSpeed's own format; a collective). With
        LoRA only the trained parameters: the frozen base weights are the run's input model."""
        self.engine.save_checkpoint(out_dir, tag="engine", client_state={"version": self.version},
                                    exclude_frozen_parameters=bool(self.cfg.lora_rank))

    def load_state(self, in_dir: str) -> None:
        # DeepSpeed's loader unpickles: the driver calls this only on the run's own checkpoint, after
        # its manifest (sha256 of every file) has been verified.
        _, client = self.engine.load_checkpoint(in_dir, tag="engine", load_module_strict=not self.cfg.lora_rank)
        self.version = client["version"]

    def send_weights(self) -> dict:
        """Send the weights (rank 0; other ranks join the ZeRO-3 gathers). Returns `WeightSender.send`'s
        {"bytes", "fingerprints"}."""
        def deliver(bucket: int, handle) -> None:  # returns once every IPC receiver has copied the bucket
            refs = [r.load_bucket.remote(bucket, handle) for r in self.ipc_receivers]
            wait(refs, "rollout", "sync", self.cfg.sync_timeout_s)

        return self.sender.send(deliver if self.ipc_receivers else None, self.group)

    def save(self, out_dir: str, tokenizer_dir: str) -> None:
        """HF-format weights (a collective under ZeRO-3; rank 0 writes)."""
        state = full_state_dict(self.engine)
        if not all(bool(torch.isfinite(t).all()) for t in (state or {}).values() if t.is_floating_point()):
            raise FloatingPointError(f"{self.role}: non-finite parameters; refusing to write them to {out_dir}")
        if self.rank == 0:
            save_hf(self.engine.module, load_tokenizer(tokenizer_dir), out_dir, state_dict=state)

    def save_adapter(self, out_dir: str) -> None:
        """The LoRA adapters (and the trained score head) as PEFT's `save_pretrained` writes them (rank 0)."""
        if self.rank != 0:
            return
        trained = [p for p in self.engine.module.parameters() if p.requires_grad]
        if not all(bool(torch.isfinite(p).all()) for p in trained):
            raise FloatingPointError(f"{self.role}: non-finite parameters; refusing to write them to {out_dir}")
        self.engine.module.save_pretrained(out_dir)


def _to_device(exp, device):
    return Experience(**{k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in exp.__dict__.items()})


class _StepStats:
    """A learner update's statistics, summed as device tensors over micro-batches and read once."""

    LOSSES = ("policy_loss", "value_loss")  # shares of their mini-batch's loss: averaged per mini-batch

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.first: dict[str, torch.Tensor] = {}  # the first mini-batch's (the ratio there must be 1)
        self.nonfinite: list[tuple[torch.Tensor, list[int]]] = []  # (loss not finite (), the micro-batch's ids)
        self.micro_batches = self.minibatches = 0
        self.grad_norm = 0.0

    def add(self, st: dict[str, torch.Tensor], bad: torch.Tensor, ids: list[int], first: bool) -> None:
        for k, v in st.items():
            v = v.detach().float()
            self.sums[k] = self.sums[k] + v if k in self.sums else v
            if first:
                keep_max = k in self.first and k in ("ratio_max", "ratio_dev_max")
                self.first[k] = torch.maximum(self.first[k], v) if keep_max else v
        self.nonfinite.append((bad, ids))
        self.micro_batches += 1

    def read(self, world: int) -> dict:
        """Means over every rank's micro-batches (losses: over mini-batches), in one host read and one
        all-reduce. Every rank runs as many micro-batches (`Learner.micro_batches`)."""
        keys, first_keys = sorted(self.sums), sorted(self.first)
        flat = torch.stack([self.sums[k] for k in keys] + [self.first[k] for k in first_keys]
                           + [bad.float() for bad, _ in self.nonfinite]).tolist() if self.nonfinite else []
        totals = all_reduce_sum(flat[:len(keys)] + [self.grad_norm])
        out = {k: v / max((self.minibatches if k in self.LOSSES else self.micro_batches) * world, 1)
               for k, v in zip(keys, totals)}
        out["grad_norm"] = totals[-1] / max(self.minibatches * world, 1)
        first = dict(zip(first_keys, flat[len(keys):len(keys) + len(first_keys)]))
        bad_flags = flat[len(keys) + len(first_keys):]
        out["nonfinite_ids"] = sorted({i for bad, (_, ids) in zip(bad_flags, self.nonfinite) if bad for i in ids})
        out["first_ratio_mean"] = first.get("ratio_mean", 1.0)
        out["first_ratio_dev_max"] = first.get("ratio_dev_max", 0.0)
        return out
