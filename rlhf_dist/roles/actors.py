"""The online roles as Ray actors (plain classes; `calls.spawn` wraps them with ray.remote): rollout
(generation) and the frozen reference and reward; the learners are in `learner.py`. No RL math lives here.

The weight sync (`weight_sync.py`) moves the policy's weights to the rollout workers by CUDA IPC on a
shared GPU, else by a broadcast in a group of its own (NCCL or gloo).
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import resource
from pathlib import Path

import torch

from ..config import load_config
from ..config.engines import installed_engines
from ..config.stages import ONLINE, micro_batch_size
from ..data.encode import encode_prompt_response, pad_right
from ..distributed import enter_workdir, set_threads
from ..io.tracking import setup_logging
from ..models import load_causal_lm, load_scalar_model, load_tokenizer, sequence_scores
from ..packing import one_row, pack, plan_micro_batches
from ..precision import use_bf16
from ..rollout.engine import SamplingParams
from ..rollout.engines import choose_engine, make_engine
from ..steps.forwards import response_logprobs
from .calls import free_port
from .placement import ROLES
from .weight_sync import Broadcast, WeightReceiver, local_device_id

log = logging.getLogger(__name__)


def forward_micro_batch(cfg) -> int:
    """Samples per no-gradient forward pass (`ppo_forward_micro_batch_size`, default the learners' micro-batch)."""
    return cfg.ppo_forward_micro_batch_size or micro_batch_size(cfg, ONLINE, cfg.roles.policy.num_workers)


def in_chunks(fn, size: int, *rows: torch.Tensor) -> torch.Tensor:
    """fn over chunks of `size` rows of `rows` (each (B, ...)), outputs concatenated on CPU: (B, ...).
    Activation memory is then that of `size` rows, whatever the batch."""
    return torch.cat([fn(*(r[i:i + size] for r in rows)).cpu() for i in range(0, rows[0].shape[0], size)])


def forward_chunks(fn, cfg, seq: torch.Tensor, attn: torch.Tensor, agree=lambda k: k) -> torch.Tensor:
    """fn(seq, attn, packed) over the no-gradient forward's chunks of a padded batch (B, L), outputs on
    CPU in row order: (B, ...). Chunks of `forward_micro_batch` rows (packed None), or with
    ppo_max_tokens_per_micro_batch, chunks of at most that many real tokens, each packed (`packing.pack`;
    `agree`: the chunk count over a learner's ranks, whose ZeRO-3 forwards are collectives)."""
    budget = cfg.ppo_max_tokens_per_micro_batch
    if budget is None:
        return in_chunks(lambda s, a: fn(s, a, None), forward_micro_batch(cfg), seq, attn)
    flat = one_row(cfg.attn_implementation)
    out: list = [None] * seq.shape[0]
    for ids in plan_micro_batches(attn.sum(1).tolist(), budget, agree):
        s, a = seq[ids], attn[ids]
        for i, y in zip(ids, fn(s, a, pack(s, a, flat)).cpu()):
            out[i] = y
    return torch.stack(out)


# ---------------------------------------------------------------------------------------
# Actors (plain classes; `spawn` wraps them with ray.remote)
# ---------------------------------------------------------------------------------------

class RoleWorker:
    def __init__(self, role: str, rank: int, config: dict, num_cpus: float, device: str):
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
        import ray  # deferred: a heavy import, needed only inside a running actor

        return {"role": self.role, "rank": self.rank, "node_id": ray.get_runtime_context().get_node_id(),
                "pid": os.getpid(), "threads": self.threads, "device": str(self.device), "bf16": self.bf16,
                "gpu_ids": ray.get_gpu_ids()}

    def address(self) -> tuple[str, int]:
        import ray  # deferred: a heavy import, needed only inside a running actor

        return ray.util.get_node_ip_address(), free_port()

    def peak_memory_mb(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated() / 2**20
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def device_id(self):
        """Node and GPU UUID: the weight sync's transport depends on them (`weight_sync.plan_sync`)."""
        import ray  # deferred: a heavy import, needed only inside a running actor

        return local_device_id(ray.get_runtime_context().get_node_id(), self.device)


class RolloutWorker(RoleWorker):
    """Generates through a `RolloutEngine` (HF or vLLM: `engine.choose_engine`), which holds the weights and
    their version. `gpu_share`: its slot's GPUs (a fraction when it shares one with another role)."""

    def __init__(self, rank: int, config: dict, num_cpus: float, device: str, model_dir: str, gpu_share: float = 0.0):
        super().__init__("rollout", rank, config, num_cpus, device)
        self.engine_name, why = choose_engine(self.cfg.rollout_engine, self.device.type, installed_engines())
        log.info("rollout-%d: engine %s (%s)", rank, self.engine_name, why)
        self.engine = make_engine(self.engine_name, self.cfg, model_dir, self.device, self.bf16, gpu_share,
                                  on_death=lambda why: engine_died(rank, why))
        self.sampling = SamplingParams.from_config(self.cfg)
        self.generator = torch.Generator(device=self.device)
        if self.cfg.gen_compile:
            from torch._inductor import config as inductor  # only with gen_compile: loading Inductor is slow

            # Inductor compiles in a pool of min(32, cores on the node) processes; the actor owns only its CPUs.
            inductor.compile_threads = self.threads

    def info(self) -> dict:
        return {**super().info(), "engine": self.engine_name}

    def generate(self, prompts: list[list[int]], sample_ids: list[int], seed: int, pad_id: int, eos_id: int):
        self.generator.manual_seed(seed)  # once per call: the engine's chunks draw from it in order
        with engine_guard(self.rank):
            return self.engine.generate(prompts, self.sampling, pad_id=pad_id, eos_id=eos_id, sample_ids=sample_ids,
                                        generator=self.generator)

    def join_sync(self, signature: list, addr: str, port: int, group_rank: int | None, world: int,
                  backend: str) -> None:
        """Take weights by IPC (`group_rank` None) or as rank `group_rank` of the broadcast group."""
        self.engine.check_signature(signature, f"rollout-{self.rank}")
        self.receiver = WeightReceiver(signature, self.engine.load_bucket)
        self.group = (None if group_rank is None else
                      Broadcast(addr, port, group_rank, world, backend, self.cfg.sync_timeout_s))

    def receive_weights(self) -> int:
        """Take the broadcast (a worker in the group); an IPC worker's buckets come by `load_bucket`."""
        with engine_guard(self.rank):
            return self.receiver.receive(self.group) if self.group is not None else 0

    def load_bucket(self, bucket: int, handle) -> int:
        with engine_guard(self.rank):
            return self.receiver.load_bucket(bucket, handle)

    def finish_sync(self, version: int, fingerprints: list) -> None:
        """Every bucket has landed (the driver calls this after every sender returned): check each against
        the sender's fingerprint (`WeightReceiver.verify`: SyncError naming a bucket), then use them as
        `version`."""
        self.receiver.verify(fingerprints, f"rollout-{self.rank}")
        with engine_guard(self.rank):
            self.engine.update_weights(version)


def engine_died(rank: int, why: str) -> None:
    """A vLLM engine whose own process died takes the rollout actor with it: one line naming it, then the
    actor exits, so Ray's restart policy applies as to any role (the driver restarts it and resyncs)."""
    log.error("rollout-%d: the vLLM engine process died (%s); exiting so that the actor restarts", rank, why)
    logging.shutdown()
    os._exit(1)


@contextlib.contextmanager
def engine_guard(rank: int):
    """A call that finds the vLLM engine dead (vLLM raises EngineDeadError) ends the actor (`engine_died`)."""
    try:
        yield
    except Exception as e:
        if type(e).__name__ != "EngineDeadError":  # vllm.v1.engine.exceptions; vLLM is not imported here
            raise
        engine_died(rank, str(e) or type(e).__name__)


class ReferenceWorker(RoleWorker):
    def __init__(self, rank: int, config: dict, num_cpus: float, device: str, model_dir: str):
        super().__init__("reference", rank, config, num_cpus, device)
        self.model = load_causal_lm(model_dir, self.bf16, self.cfg.attn_implementation).to(self.device).eval()
        self.model.requires_grad_(False)

    @torch.no_grad()
    def logprobs(self, samples) -> torch.Tensor:
        def one(seq, attn, packed):  # (b, P+R) -> (b, R)
            return response_logprobs(self.model, seq.to(self.device), attn.to(self.device), samples.prompt_len,
                                     self.cfg.gen_temperature, packed and packed.to(self.device))

        return forward_chunks(one, self.cfg, samples.sequences, samples.attention_mask)  # (B, R)


class RewardWorker(RoleWorker):
    """The frozen reward model and/or a Python reward function; scores combine with their weights."""

    def __init__(self, rank: int, config: dict, num_cpus: float, device: str, model_dir: str | None,
                 policy_tokenizer_dir: str):
        super().__init__("reward", rank, config, num_cpus, device)
        self.policy_tok = load_tokenizer(policy_tokenizer_dir)
        self.model = self.tok = None
        if model_dir is not None and self.cfg.reward_model_weight != 0:
            self.tok = load_tokenizer(model_dir)
            self.model = load_scalar_model(model_dir, self.bf16, self.tok.pad_token_id,
                                           self.cfg.attn_implementation).to(self.device).eval()
            self.model.requires_grad_(False)
            # Same vocabulary and template: score the policy's tokens as they are; else re-tokenise the text.
            self.same_tokens = (self.tok.get_vocab() == self.policy_tok.get_vocab()
                                and self.tok.chat_template == self.policy_tok.chat_template)
            log.info("reward model %s; %s", model_dir,
                     "same tokenizer as the policy" if self.same_tokens else "different tokenizer: re-tokenising text")
        self.fn = None
        if self.cfg.reward_fn:
            mod, name = self.cfg.reward_fn.split(":")
            self.fn = getattr(importlib.import_module(mod), name)

    @torch.no_grad()
    def score(self, samples, prompts: list[list[dict]]) -> dict:
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
            rm = forward_chunks(lambda i, a, p: sequence_scores(self.model, i.to(self.device), a.to(self.device),
                                                                p and p.to(self.device)).float(),
                                self.cfg, ids, attn)  # (B,)
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
