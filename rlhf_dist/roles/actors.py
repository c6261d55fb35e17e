"""PPO roles as Ray actors: placement, weight sync and timeouts. No RL math lives here.

Roles: rollout (generation), policy and critic (DeepSpeed learners), reference and reward (frozen).
Each actor of a learner role with several workers joins its role's own default process group (its
DeepSpeed data-parallel group). Weight sync (`weight_sync.py`) moves the policy's weights to the rollout
workers by CUDA IPC on a shared GPU, else by a broadcast in a group of its own (NCCL or gloo).
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
import time
from pathlib import Path

import torch

from ..errors import PhaseTimeout, RoleFailure
from ..precision import use_bf16
from .placement import ROLES, Slot

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------
# Remote calls
# ---------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def wait(refs, role: str, phase: str, timeout: float):
    """ray.get with a timeout; errors name the role and the phase."""
    import ray
    from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

    try:
        return ray.get(refs, timeout=timeout)
    except GetTimeoutError:
        raise PhaseTimeout(f"{role}: phase '{phase}' timed out after {timeout:.0f}s") from None
    except RayActorError as e:
        raise RoleFailure(f"{role}: actor died during phase '{phase}': {e.__class__.__name__}", died=True) from e
    except RayTaskError as e:
        raise RoleFailure(f"{role}: phase '{phase}' failed: {e.cause!r}", cause=e.cause) from e


def forward_micro_batch(cfg) -> int:
    """Samples per no-gradient forward pass (`ppo_forward_micro_batch_size`, default the learners' micro-batch)."""
    return (cfg.ppo_forward_micro_batch_size or cfg.ppo_micro_batch_size
            or cfg.ppo_mini_batch_size // cfg.roles.policy.num_workers)


def in_chunks(fn, size: int, *rows: torch.Tensor) -> torch.Tensor:
    """fn over chunks of `size` rows of `rows` (each (B, ...)), outputs concatenated on CPU: (B, ...).
    Activation memory is then that of `size` rows, whatever the batch."""
    return torch.cat([fn(*(r[i:i + size] for r in rows)).cpu() for i in range(0, rows[0].shape[0], size)])


# ---------------------------------------------------------------------------------------
# Actors (plain classes; `spawn` wraps them with ray.remote)
# ---------------------------------------------------------------------------------------

class RoleWorker:
    def __init__(self, role: str, rank: int, config: dict, num_cpus: float, device: str):
        from ..config import load_config
        from ..distributed import enter_workdir, set_threads
        from ..io.tracking import setup_logging

        config = dict(config)
        enter_workdir(config.pop("_cwd", ""))
        self.cfg = load_config(config)
        self.role, self.rank = role, rank
        self.device = torch.device("cuda" if device == "cuda" else "cpu")
        self.bf16 = use_bf16(self.cfg.bf16, self.device.type)
        setup_logging(self.cfg.log_level, Path(self.cfg.save_dir) / "logs", role=f"{role}-{rank}")
        self.threads = set_threads(num_cpus)
        self.version = 0
        torch.manual_seed(self.cfg.seed + 1000 * ROLES.index(role) + rank)

    def info(self) -> dict:
        import ray

        return {"role": self.role, "rank": self.rank, "node_id": ray.get_runtime_context().get_node_id(),
                "pid": os.getpid(), "threads": self.threads, "device": str(self.device), "bf16": self.bf16,
                "gpu_ids": ray.get_gpu_ids()}

    def address(self) -> tuple[str, int]:
        import ray

        return ray.util.get_node_ip_address(), free_port()

    def peak_memory_mb(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated() / 2**20
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def device_id(self):
        """Node and GPU UUID: the weight sync's transport depends on them (`weight_sync.plan_sync`)."""
        import ray

        from .weight_sync import local_device_id

        return local_device_id(ray.get_runtime_context().get_node_id(), self.device)


class RolloutWorker(RoleWorker):
    def __init__(self, rank: int, config: dict, num_cpus: float, device: str, model_dir: str):
        super().__init__("rollout", rank, config, num_cpus, device)
        from ..models import load_causal_lm

        self.model = load_causal_lm(model_dir, self.bf16).to(self.device).eval()
        self.generator = torch.Generator(device=self.device)
        if self.cfg.gen_compile:
            from torch._inductor import config as inductor

            # Inductor compiles in a pool of min(32, cores on the node) processes; the actor owns only its CPUs.
            inductor.compile_threads = self.threads

    def generate(self, prompts: list[list[int]], sample_ids: list[int], seed: int, pad_id: int, eos_id: int):
        from ..rollout import generate_chunked

        self.generator.manual_seed(seed)  # once per call: the chunks draw from it in order
        c = self.cfg
        return generate_chunked(self.model, prompts, c.gen_batch_size, pad_id=pad_id, eos_id=eos_id,
                                max_new_tokens=c.gen_max_new_tokens, temperature=c.gen_temperature,
                                top_p=c.gen_top_p, top_k=c.gen_top_k, min_new_tokens=c.gen_min_new_tokens,
                                generator=self.generator, sample_ids=sample_ids, version=self.version,
                                compiled=c.gen_compile)

    def join_sync(self, signature: list, addr: str, port: int, group_rank: int | None, world: int,
                  backend: str) -> None:
        """Take weights by IPC (`group_rank` None) or as rank `group_rank` of the broadcast group."""
        from .weight_sync import Broadcast, WeightReceiver

        self.receiver = WeightReceiver(self.model.named_parameters(), signature, f"rollout-{self.rank}")
        self.group = (None if group_rank is None else
                      Broadcast(addr, port, group_rank, world, backend, self.cfg.sync_timeout_s))

    def receive_weights(self, version: int) -> int:
        """Take the broadcast (a worker in the group); an IPC worker's buckets come by `load_bucket`."""
        moved = self.receiver.receive(self.group) if self.group is not None else 0
        self.version = version
        return moved

    def load_bucket(self, bucket: int, handle) -> int:
        return self.receiver.load_bucket(bucket, handle)


class ReferenceWorker(RoleWorker):
    def __init__(self, rank: int, config: dict, num_cpus: float, device: str, model_dir: str):
        super().__init__("reference", rank, config, num_cpus, device)
        from ..models import load_causal_lm

        self.model = load_causal_lm(model_dir, self.bf16).to(self.device).eval().requires_grad_(False)

    @torch.no_grad()
    def logprobs(self, samples) -> torch.Tensor:
        from ..online.experience import response_logprobs

        def one(seq, attn):  # (b, P+R) -> (b, R)
            return response_logprobs(self.model, seq.to(self.device), attn.to(self.device), samples.prompt_len,
                                     self.cfg.gen_temperature)

        return in_chunks(one, forward_micro_batch(self.cfg), samples.sequences, samples.attention_mask)  # (B, R)


class RewardWorker(RoleWorker):
    """The frozen reward model and/or a Python reward function; scores combine with their weights."""

    def __init__(self, rank: int, config: dict, num_cpus: float, device: str, model_dir: str | None,
                 policy_tokenizer_dir: str):
        super().__init__("reward", rank, config, num_cpus, device)
        from ..models import load_scalar_model, load_tokenizer

        self.policy_tok = load_tokenizer(policy_tokenizer_dir)
        self.model = self.tok = None
        if model_dir is not None and self.cfg.reward_model_weight != 0:
            self.tok = load_tokenizer(model_dir)
            self.model = load_scalar_model(model_dir, self.bf16, self.tok.pad_token_id).to(self.device).eval()
            self.model.requires_grad_(False)
            # Same vocabulary and template: score the policy's tokens as they are; else re-tokenise the text.
            self.same_tokens = (self.tok.get_vocab() == self.policy_tok.get_vocab()
                                and self.tok.chat_template == self.policy_tok.chat_template)
            log.info("reward model %s; %s", model_dir,
                     "same tokenizer as the policy" if self.same_tokens else "different tokenizer: re-tokenising text")
        self.fn = None
        if self.cfg.reward_fn:
            import importlib

            mod, name = self.cfg.reward_fn.split(":")
            self.fn = getattr(importlib.import_module(mod), name)

    @torch.no_grad()
    def score(self, samples, prompts: list[list[dict]]) -> dict:
        from ..data import encode_prompt_response
        from ..models import sequence_scores
        from ..data import pad_right

        responses = [self.policy_tok.decode(r[m.bool()], skip_special_tokens=True)
                     for r, m in zip(samples.responses, samples.action_mask)]
        B = len(responses)
        total = torch.zeros(B)
        out: dict = {"responses": responses}
        if self.model is not None:
            if self.same_tokens:
                ids, attn = samples.sequences, samples.attention_mask
            else:
                enc = [encode_prompt_response(self.tok, p, r).input_ids for p, r in zip(prompts, responses)]
                ids, attn = pad_right(enc, self.tok.pad_token_id)
            rm = in_chunks(lambda i, a: sequence_scores(self.model, i.to(self.device), a.to(self.device)).float(),
                           forward_micro_batch(self.cfg), ids, attn)  # (B,)
            out["rm_score"] = rm
            total += self.cfg.reward_model_weight * rm
        if self.fn is not None:
            prompt_text = [p[-1]["content"] for p in prompts]
            vals = self.fn(prompt_text, responses)
            fn = torch.tensor([float(v) for v in vals], dtype=torch.float32)
            if fn.shape != (B,):
                raise ValueError(f"reward_fn {self.cfg.reward_fn} returned {len(vals)} values for {B} responses")
            out["fn_score"] = fn
            total += self.cfg.reward_fn_weight * fn
        out["score"] = total
        return out


class Learner(RoleWorker):
    """A DeepSpeed engine for the policy (kind="policy") or the critic (kind="critic")."""

    def __init__(self, kind: str, rank: int, world: int, config: dict, num_cpus: float, device: str):
        super().__init__(kind, rank, config, num_cpus, device)
        self.kind, self.world = kind, world
        self.engine = None

    def setup(self, addr: str, port: int, model_dir: str, total_steps: int) -> dict:
        import torch.distributed as dist

        from ..distributed import init_local_group_env, make_engine
        from ..models import load_causal_lm, load_scalar_model, load_tokenizer

        init_local_group_env(self.rank, self.world, addr, port)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo", rank=self.rank,
                                    world_size=self.world, timeout=datetime.timedelta(seconds=self.cfg.call_timeout_s))
        c = self.cfg
        if self.kind == "policy":
            model = load_causal_lm(model_dir, self.bf16)
            lr = c.ppo_lr_policy
        else:
            tok = load_tokenizer(model_dir)
            model = load_scalar_model(model_dir, self.bf16, tok.pad_token_id)
            lr = c.ppo_lr_value
        micro = c.ppo_micro_batch_size or c.ppo_mini_batch_size // self.world
        self.micro = micro
        self.accum = c.ppo_mini_batch_size // (micro * self.world)
        self.engine = make_engine(model, lr=lr, total_steps=total_steps, warmup_steps=0, micro_batch=micro,
                                  grad_accum=self.accum, zero_stage=c.zero_stage, grad_clip=c.ppo_max_grad_norm,
                                  bf16=self.bf16, constant_lr=True)
        return {"params": sum(p.numel() for p in model.parameters())}

    def signature(self) -> list:
        from .weight_sync import param_signature

        return param_signature(self.engine.module.named_parameters())

    def join_sync(self, addr: str, port: int, world: int, backend: str, ipc_receivers: list) -> None:
        """Every policy rank gets a sender (ZeRO-3 gathers are collectives); rank 0 also sends: by CUDA IPC
        to `ipc_receivers` (rollout actors on its GPU) and as rank 0 of the broadcast group when `world` > 1."""
        from .weight_sync import Broadcast, WeightSender

        self.sender = WeightSender(self.engine.module.named_parameters(), self.rank, self.engine.zero_optimization_stage() == 3)
        self.ipc_receivers = ipc_receivers if self.rank == 0 else []
        self.group = (Broadcast(addr, port, 0, world, backend, self.cfg.sync_timeout_s)
                      if self.rank == 0 and world > 1 else None)

    @torch.no_grad()
    def forward(self, samples) -> torch.Tensor:
        """Old logprobs (policy) or values (critic) for a slice of the batch: (b, R)."""
        from ..online.experience import response_logprobs, response_values

        def one(seq, attn):  # (b, P+R) -> (b, R)
            s, a = seq.to(self.engine.device), attn.to(self.engine.device)
            if self.kind == "policy":
                return response_logprobs(self.engine.module, s, a, samples.prompt_len, self.cfg.gen_temperature).float()
            return response_values(self.engine.module, s, a, samples.prompt_len).float()

        self.engine.eval()
        out = in_chunks(one, forward_micro_batch(self.cfg), samples.sequences, samples.attention_mask)  # (B, R)
        self.engine.train()
        return out

    def train(self, exp, seed: int, kl_coef: float = 0.0) -> dict:
        """ppo_epochs x mini-batches over the experience; this rank takes its share of each mini-batch.
        `kl_coef`: the KL term's weight in the policy loss (with kl_in: loss)."""
        from ..distributed import all_reduce_sum
        from ..algo import kl_estimator_for, loss_units
        from ..online.update import minibatches, policy_loss, token_weight, value_loss

        c = self.cfg
        dev = self.engine.device
        stats_sum: dict[str, float] = {}
        n_steps = 0
        first: dict[str, float] = {}
        skipped_before = self.engine.skipped_steps
        nonfinite_ids: list[int] = []
        for j, idx in enumerate(minibatches(len(exp), c.ppo_mini_batch_size, c.ppo_epochs, seed)):
            mb = exp.select(idx)
            tokens = float(mb.action_mask.sum())
            units = float(loss_units(mb.action_mask, c.loss_agg))  # what the policy loss averages over
            per_rank = len(idx) // self.world
            mine = mb.select(list(range(self.rank * per_rank, (self.rank + 1) * per_rank)))
            for m in range(self.accum):
                micro = mine.select(list(range(m * self.micro, (m + 1) * self.micro)))
                micro = _to_device(micro, dev)
                w = token_weight(micro, tokens, self.world * self.accum)
                if self.kind == "policy":
                    loss, st = policy_loss(self.engine.module, micro, clip_range=c.ppo_clip_range,
                                           entropy_coef=c.ppo_entropy_coef, temperature=c.gen_temperature,
                                           agg=c.loss_agg, units=units, scale=self.world * self.accum,
                                           kl_coef=kl_coef if c.kl_in == "loss" else 0.0,
                                           kl_estimator=kl_estimator_for(c.kl_in, c.kl_estimator))
                else:
                    loss, st = value_loss(self.engine.module, micro, clip_range=c.ppo_value_clip_range, weight=w)
                if not torch.isfinite(loss):
                    nonfinite_ids += micro.sample_ids
                # A non-finite loss gives non-finite gradients; DeepSpeed's ZeRO-1/2 optimizer then skips
                # the whole optimizer step (counted in engine.skipped_steps), so no NaN reaches the weights.
                self.engine.backward(loss)
                self.engine.step()
                for k, v in st.items():
                    stats_sum[k] = stats_sum.get(k, 0.0) + v
                if j == 0:
                    for k, v in st.items():
                        first[k] = max(first.get(k, v), v) if k in ("ratio_max", "ratio_dev_max") else v
                n_steps += 1
            gn = self.engine.get_global_grad_norm()
            stats_sum["grad_norm"] = stats_sum.get("grad_norm", 0.0) + (float(gn) if gn is not None else 0.0) * self.accum
        keys = sorted(stats_sum)
        totals = all_reduce_sum([stats_sum[k] for k in keys])
        out = {k: v / (n_steps * self.world) for k, v in zip(keys, totals)}
        out["skipped_steps"] = self.engine.skipped_steps - skipped_before
        out["nonfinite_ids"] = sorted(set(nonfinite_ids))
        out["params_finite"] = self.params_finite()
        if self.kind == "policy":
            out["first_ratio_mean"] = first.get("ratio_mean", 1.0)
            out["first_ratio_dev_max"] = first.get("ratio_dev_max", 0.0)
            self.version += 1
            out["version"] = self.version
        return out

    def params_finite(self) -> bool:
        """Every parameter finite, on every rank. Under ZeRO-3 each rank checks its own partition
        (`ds_tensor`), so together they check every element. One host sync."""
        from ..distributed import all_reduce_sum

        parts = [getattr(p, "ds_tensor", p) for p in self.engine.module.parameters()]
        bad = torch.stack([(~torch.isfinite(t)).any() for t in parts if t.numel()]).any()
        return all_reduce_sum([float(bad)])[0] == 0

    def save_state(self, out_dir: str) -> None:
        """Optimizer and scheduler state for an exact resume (DeepSpeed's own format; a collective)."""
        self.engine.save_checkpoint(out_dir, tag="engine", client_state={"version": self.version})

    def load_state(self, in_dir: str) -> None:
        # DeepSpeed's loader unpickles: the driver calls this only on the run's own checkpoint, after
        # its manifest (sha256 of every file) has been verified.
        _, client = self.engine.load_checkpoint(in_dir, tag="engine")
        self.version = client["version"]

    def send_weights(self) -> int:
        """Send the weights (rank 0; other ranks join the ZeRO-3 gathers). Returns the bytes sent."""
        def deliver(bucket: int, handle) -> None:  # returns once every IPC receiver has copied the bucket
            refs = [r.load_bucket.remote(bucket, handle) for r in self.ipc_receivers]
            wait(refs, "rollout", "sync", self.cfg.sync_timeout_s)

        return self.sender.send(deliver if self.ipc_receivers else None, self.group)

    def save(self, out_dir: str, tokenizer_dir: str) -> None:
        """HF-format weights (a collective under ZeRO-3; rank 0 writes)."""
        from ..distributed import full_state_dict
        from ..models import load_tokenizer, save_hf

        state = full_state_dict(self.engine)
        if not all(bool(torch.isfinite(t).all()) for t in (state or {}).values() if t.is_floating_point()):
            raise FloatingPointError(f"{self.role}: non-finite parameters; refusing to write them to {out_dir}")
        if self.rank == 0:
            save_hf(self.engine.module, load_tokenizer(tokenizer_dir), out_dir, state_dict=state)


def _to_device(exp, device):
    from ..online.experience import Experience

    return Experience(**{k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in exp.__dict__.items()})


def spawn(cls, slot: Slot, pg, *args, max_restarts: int = 0):
    """Start `cls` as a Ray actor in its placement-group bundle."""
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    opts = dict(num_cpus=slot.num_cpus, num_gpus=slot.num_gpus, max_restarts=max_restarts,
                scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=slot.bundle),
                name=None, runtime_env={"env_vars": {"OMP_NUM_THREADS": str(max(1, round(slot.num_cpus)))}})
    if slot.resources:
        opts["resources"] = slot.resources
    return ray.remote(cls).options(**opts).remote(*args)


def create_placement_group(bundles: list[dict], strategy: str, timeout: float):
    import ray
    from ray.util.placement_group import placement_group

    pg = placement_group(bundles, strategy=strategy)
    t = time.time()
    ready, _ = ray.wait([pg.ready()], timeout=timeout)
    if not ready:
        need: dict[str, float] = {}
        for b in bundles:
            for k, v in b.items():
                need[k] = need.get(k, 0) + v
        raise PhaseTimeout(f"placement: bundles {bundles} (total {need}) could not be placed in {time.time() - t:.0f}s; "
                           f"cluster has {ray.cluster_resources()}")
    return pg
