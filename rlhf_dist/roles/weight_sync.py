"""Weight sync: the policy learner's weights into the rollout workers, by topology.

For each rollout worker, the transport depends on where it sits against learner rank 0:
- the same physical GPU (same node, same device UUID): CUDA IPC. NCCL refuses two ranks on one
  device ("Duplicate GPU detected"), so rank 0 exports each bucket as an IPC handle
  (`torch.multiprocessing.reductions.reduce_tensor`, as verl and OpenRLHF do when colocated), sends
  the handle through Ray, and the worker copies from it;
- another GPU: a bucketed NCCL broadcast in a dedicated process group;
- a CPU on either side: the same broadcast over gloo.

Weights move in flattened, dtype-uniform buckets of about `BUCKET_BYTES`: few collectives or handles,
and at most one extra bucket of memory on each side. Under ZeRO-3 the learner's parameters are empty
partitions, so every learner rank gathers each bucket (`deepspeed.zero.GatheredParameters`, a
collective) and rank 0 sends it.
"""

from __future__ import annotations

import contextlib
import datetime
import math
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.distributed as dist

from ..rollout.transfer import export_ipc, fingerprint, open_ipc
from ..runtime.errors import PhaseTimeout, PlacementError

BUCKET_BYTES = 64 << 20  # few enough collectives, small enough to not double peak memory


@dataclass(frozen=True)
class DeviceId:
    """Where a process computes: its Ray node and its GPU's UUID (None on CPU). Device indices are not
    comparable across actors: each sees its own CUDA_VISIBLE_DEVICES."""

    node: str
    uuid: str | None


def local_device_id(node: str, device: torch.device) -> DeviceId:
    if device.type != "cuda":
        return DeviceId(node, None)
    return DeviceId(node, str(torch.cuda.get_device_properties(device).uuid))


@dataclass(frozen=True)
class SyncPlan:
    """Per rollout worker 'ipc' or 'group'; the group (learner rank 0 = group rank 0, then the workers
    marked 'group' in order) runs on `backend` ('nccl' or 'gloo')."""

    transports: tuple[str, ...]
    backend: str

    @property
    def group_ranks(self) -> list[int]:
        """Rollout worker indices in the broadcast group, in group-rank order (1, 2, ...)."""
        return [i for i, t in enumerate(self.transports) if t == "group"]


def plan_sync(learner: DeviceId, workers: list[DeviceId]) -> SyncPlan:
    """The transport of each rollout worker. Pure, so the rule is tested without GPUs.

    Raises PlacementError when two workers outside the learner's GPU share a GPU: NCCL cannot hold both.
    """
    transports = tuple("ipc" if w.uuid is not None and w == learner else "group" for w in workers)
    in_group = [w for w, t in zip(workers, transports) if t == "group"]
    nccl = learner.uuid is not None and all(w.uuid is not None for w in in_group)
    if nccl:
        seen: dict[DeviceId, int] = {}
        for i, (w, t) in enumerate(zip(workers, transports)):
            if t != "group":
                continue
            if w in seen:
                raise PlacementError(
                    f"rollout-{seen[w]} and rollout-{i} share GPU {w.uuid} on node {w.node[:12]}, away from the policy "
                    "learner: NCCL refuses two ranks of the weight-sync group on one device. Give each rollout worker "
                    "its own GPU, or put the rollout on the policy learner's GPU (weights then move by CUDA IPC)")
            seen[w] = i
    return SyncPlan(transports, "nccl" if nccl else "gloo")


# ---------------------------------------------------------------------------------------
# Buckets (pure)
# ---------------------------------------------------------------------------------------

def full_shape(p: torch.Tensor) -> tuple:
    return tuple(getattr(p, "ds_shape", p.shape))


def param_signature(named_params) -> list[tuple[str, tuple, str]]:
    """(name, full shape, dtype) of each parameter: sender and receivers must agree before any sync."""
    return [(n, full_shape(p), str(p.dtype)) for n, p in named_params]


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name.removeprefix("torch."))


def make_buckets(signature: list[tuple[str, tuple, str]], bucket_bytes: int = BUCKET_BYTES) -> list[list[int]]:
    """Consecutive parameter indices in dtype-uniform buckets of at most `bucket_bytes` (a larger parameter
    gets a bucket of its own). Made from the sender's signature on both sides, so they agree even where
    the receiver holds another dtype (a CPU rollout in float32 beside bf16 learners)."""
    buckets: list[list[int]] = []
    size = 0
    for i, (_, shape, dtype) in enumerate(signature):
        nbytes = math.prod(shape) * _dtype(dtype).itemsize
        if buckets and size + nbytes <= bucket_bytes and dtype == signature[buckets[-1][0]][2]:
            buckets[-1].append(i)
            size += nbytes
        else:
            buckets.append([i])
            size = nbytes
    return buckets


def flatten(params: list[torch.Tensor]) -> torch.Tensor:
    """One flat tensor of the (gathered) parameters: (sum of numels,)."""
    return torch.cat([p.detach().reshape(-1) for p in params])


# ---------------------------------------------------------------------------------------
# Sender (every policy learner rank) and receiver (each rollout worker)
# ---------------------------------------------------------------------------------------

def _gathered(params: list[torch.Tensor], zero3: bool):
    if not zero3:
        return contextlib.nullcontext()
    import deepspeed  # deferred: loading deepspeed takes seconds

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


class Broadcast:
    """The dedicated broadcast group (rank 0 = learner rank 0), on a TCPStore of its own so it never touches
    the learners' data-parallel group."""

    def __init__(self, addr: str, port: int, rank: int, world: int, backend: str, timeout_s: float):
        self.rank = rank
        self.timeout = datetime.timedelta(seconds=timeout_s)
        store = dist.TCPStore(addr, port, world, rank == 0, timeout=self.timeout)
        if backend == "nccl":
            self.pg = dist.ProcessGroupNCCL(store, rank, world)
        else:
            self.pg = dist.ProcessGroupGloo(store, rank, world, self.timeout)
        self.device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")

    def __call__(self, flat: torch.Tensor) -> torch.Tensor:
        """Broadcast from rank 0; `flat` is what rank 0 sends, or a buffer of the right size and dtype."""
        flat = flat.to(self.device)
        work = self.pg.broadcast([flat])
        if not work.wait(self.timeout):
            raise PhaseTimeout(f"weight sync: broadcast timed out after {self.timeout.total_seconds():.0f}s")
        return flat


class WeightSender:
    """Learner side. Rank 0 sends each bucket to the IPC receivers (`deliver`) and to the broadcast group;
    the other ranks only take part in the ZeRO-3 gathers."""

    def __init__(self, named_params, rank: int, zero3: bool, bucket_bytes: int = BUCKET_BYTES,
                 tensors: Callable[[], Iterator[torch.Tensor]] | None = None):
        """`tensors`: called once per send, yields what to send in `named_params`' order and shapes (LoRA:
        the weights merged afresh, one bucket's worth alive at a time); default the parameters themselves."""
        named_params = list(named_params)
        self.params = [p for _, p in named_params]
        self.rank, self.zero3, self.tensors = rank, zero3, tensors
        self.buckets = make_buckets(param_signature(named_params), bucket_bytes)

    @torch.no_grad()
    def send(self, deliver: Callable[[int, object], None] | None, group: Broadcast | None) -> dict:
        """Returns {"bytes": sent, "fingerprints": one `transfer.fingerprint` per bucket} (0 and [] on ranks
        other than 0). `deliver(bucket, handle)` returns once every IPC receiver has copied the bucket, so the
        bucket can be freed."""
        moved, prints = 0, []
        fresh = self.tensors() if self.tensors is not None else None
        for b, idx in enumerate(self.buckets):
            params = [self.params[i] for i in idx]
            with _gathered(params, self.zero3):
                if self.rank != 0:
                    continue
                flat = flatten(params if fresh is None else [next(fresh) for _ in idx])
                prints.append(fingerprint(flat))
                if deliver is not None:
                    deliver(b, export_ipc(flat) if flat.is_cuda else flat)
                if group is not None:
                    group(flat)
                moved += flat.numel() * flat.element_size()
        if deliver is not None and torch.cuda.is_available():
            torch.cuda.ipc_collect()  # blocks the receivers have let go of return to the allocator
        return {"bytes": moved, "fingerprints": prints}


def bucket_entries(signature: list, idx: list[int]) -> list[tuple[str, tuple]]:
    """(name, full shape) of a bucket's parameters, in the order their values sit in its flat tensor."""
    return [(signature[i][0], tuple(signature[i][1])) for i in idx]


class SyncError(RuntimeError):
    """A weight sync delivered something else than the learner sent; names the bucket."""


class WeightReceiver:
    """Rollout side: takes the learner's buckets, from IPC handles or the broadcast, and hands each to
    `load(flat, entries)` (the engine's `load_bucket`): flat (N,) in the sender's dtype, entries the
    (name, shape) of the parameters in it. `load` returns the fingerprint of what the engine then holds,
    which `verify` checks against the sender's once the sync is over."""

    def __init__(self, signature: list, load: Callable[[torch.Tensor, list], tuple], bucket_bytes: int = BUCKET_BYTES):
        self.signature = [(n, tuple(s), d) for n, s, d in signature]
        self.dtypes = [_dtype(d) for _, _, d in self.signature]
        self.buckets = make_buckets(self.signature, bucket_bytes)
        self.load = load
        self.landed: dict[int, tuple] = {}  # bucket -> fingerprint of what the engine holds, this sync

    def _load(self, b: int, flat: torch.Tensor) -> None:
        self.landed[b] = tuple(self.load(flat, bucket_entries(self.signature, self.buckets[b])))

    def verify(self, sent: list, who: str) -> None:
        """Every bucket landed as it was sent (`sent`: the sender's fingerprints), else SyncError naming the
        first bucket that did not; then a new sync starts."""
        landed, self.landed = self.landed, {}
        for b, want in enumerate(sent):
            got = landed.get(b)
            if got != tuple(want):
                first = self.signature[self.buckets[b][0]][0]
                what = "never arrived" if got is None else f"arrived with fingerprint {got}, sent as {tuple(want)}"
                raise SyncError(f"{who}: weight sync bucket {b} of {len(sent)} (from {first}) {what}")

    def load_bucket(self, b: int, handle) -> int:
        """One bucket from an IPC handle (a CUDA tensor's, or a plain tensor where there is no GPU)."""
        flat = open_ipc(handle) if isinstance(handle, tuple) else handle
        self._load(b, flat)
        if flat.is_cuda:
            torch.cuda.current_stream().synchronize()  # copied before the sender frees the bucket
        return flat.numel() * flat.element_size()

    @torch.no_grad()
    def receive(self, group: Broadcast) -> int:
        moved = 0
        for b, idx in enumerate(self.buckets):
            n = sum(math.prod(self.signature[i][1]) for i in idx)
            flat = group(torch.empty(n, dtype=self.dtypes[idx[0]], device=group.device))
            self._load(b, flat)
            moved += flat.numel() * flat.element_size()
        return moved


def push_weights(named_params, load: Callable[[torch.Tensor, list], tuple], bucket_bytes: int = BUCKET_BYTES) -> int:
    """In one process: a model's weights into an engine's `load_bucket`, bucket by bucket (eval's checkpoints
    into one vLLM engine; tests). Returns the bytes moved."""
    named_params = [(n, p.detach()) for n, p in named_params]
    sig = param_signature(named_params)
    moved = 0
    for idx in make_buckets(sig, bucket_bytes):
        flat = flatten([named_params[i][1] for i in idx])
        load(flat, bucket_entries(sig, idx))
        moved += flat.numel() * flat.element_size()
    return moved
