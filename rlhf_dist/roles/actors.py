"""The online roles as Ray actors (plain classes; `calls.spawn` wraps them with ray.remote): rollout
(generation) and the frozen reference and reward; the learners are in `learner.py`. No RL math lives here.

The weight sync (`weight_sync.py`) moves the policy's weights to the rollout workers by CUDA IPC on a
shared GPU, else by a broadcast in a group of its own (NCCL or gloo).
"""

from __future__ import annotations

import contextlib
import logging
import os
import resource
from pathlib import Path

import torch

from ..config import load_config
from ..config.engines import installed_engines
from ..io.tracking import setup_logging
from ..models.load import load_causal_lm, load_tokenizer
from ..models.precision import use_bf16
from ..rewards.base import RewardBatch, RewardOutput, SourceContext
from ..rewards.sources import RewardSources
from ..rollout.engine import SamplingParams
from ..rollout.engines import choose_engine, make_engine
from ..runtime.distributed import enter_workdir, set_threads
from ..steps.forwards import forward_chunks, response_logprobs
from .calls import free_port
from .placement import ROLES
from .weight_sync import Broadcast, WeightReceiver, local_device_id

log = logging.getLogger(__name__)


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
    """The run's reward sources (`rewards.RewardSources`: the reward model, a function, a server), combined
    with their weights."""

    def __init__(self, rank: int, config: dict, num_cpus: float, device: str, model_dir: str | None,
                 policy_tokenizer_dir: str):
        super().__init__("reward", rank, config, num_cpus, device)
        self.policy_tok = load_tokenizer(policy_tokenizer_dir)
        self.sources = RewardSources(self.cfg, SourceContext(self.device, self.bf16, self.policy_tok, model_dir))

    def score(self, samples, prompts: list[list[dict]], metadata: list[dict]) -> RewardOutput:
        """`prompts`, `metadata`: each sample's prompt and its row's other fields."""
        responses = [self.policy_tok.decode(r[m.bool()], skip_special_tokens=True)
                     for r, m in zip(samples.responses, samples.action_mask)]
        return self.sources.score(RewardBatch(prompts, responses, list(samples.sample_ids), metadata,
                                              samples.sequences, samples.attention_mask))
