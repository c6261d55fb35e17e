"""Weight sync on CPU: the transport rule (pure), buckets, the IPC receiver's bucket protocol, and the
broadcast from a ZeRO-3 learner pair (gathers over gloo) into a rollout process."""

import multiprocessing as mp

import pytest
import torch

from rlhf_dist.roles.weight_sync import (
    DeviceId,
    SyncError,
    WeightReceiver,
    WeightSender,
    make_buckets,
    param_signature,
    plan_sync,
)
from rlhf_dist.rollout.engine import HFDecodeEngine
from rlhf_dist.rollout.transfer import fingerprint, open_ipc
from rlhf_dist.runtime.errors import PlacementError

GPU0, GPU1 = "GPU-aaaa", "GPU-bbbb"


def test_same_gpu_uses_ipc_other_gpus_nccl():
    learner = DeviceId("n1", GPU0)
    plan = plan_sync(learner, [DeviceId("n1", GPU0), DeviceId("n1", GPU1), DeviceId("n2", GPU0)])
    # The same UUID on another node is another GPU (UUIDs are per device, but the node is compared too).
    assert plan.transports == ("ipc", "group", "group") and plan.backend == "nccl"
    assert plan.group_ranks == [1, 2]


def test_every_rollout_on_the_learners_gpu_needs_no_group():
    learner = DeviceId("n1", GPU0)
    plan = plan_sync(learner, [learner, learner])
    assert plan.transports == ("ipc", "ipc") and plan.group_ranks == []


def test_cpu_on_either_side_uses_gloo():
    assert plan_sync(DeviceId("n1", None), [DeviceId("n1", None)]) .transports == ("group",)
    assert plan_sync(DeviceId("n1", None), [DeviceId("n1", None)]).backend == "gloo"
    # A CPU rollout worker beside GPU learners: gloo, since NCCL cannot reach the CPU.
    assert plan_sync(DeviceId("n1", GPU0), [DeviceId("n1", None)]).backend == "gloo"


def test_two_rollouts_sharing_a_gpu_away_from_the_learner_is_refused():
    with pytest.raises(PlacementError, match="rollout-0 and rollout-1 share GPU GPU-bbbb.*NCCL refuses"):
        plan_sync(DeviceId("n1", GPU0), [DeviceId("n1", GPU1), DeviceId("n1", GPU1)])


def test_buckets_are_dtype_uniform_and_bounded():
    sig = [("a", (10,), "torch.float32"), ("b", (10,), "torch.float32"), ("c", (30,), "torch.float32"),
           ("d", (4,), "torch.bfloat16"), ("e", (4,), "torch.bfloat16")]
    # 80 bytes a bucket: a+b = 80; c (120) alone; d+e bf16 = 16 bytes, apart from the float32 ones.
    assert make_buckets(sig, bucket_bytes=80) == [[0, 1], [2], [3, 4]]


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4))


def test_ipc_protocol_moves_every_bucket_and_casts_to_the_receivers_dtype():
    """The sender hands each bucket to `deliver` (on a GPU: a CUDA IPC handle; here the CPU tensor itself),
    and the receiver copies it into its own parameters, here in another dtype than the sender's."""
    src, dst = _model(0), _model(1).to(torch.float64)
    sender = WeightSender(src.named_parameters(), rank=0, zero3=False, bucket_bytes=256)
    sig = param_signature(src.named_parameters())
    engine = HFDecodeEngine(dst)
    engine.check_signature(sig, "rollout-0")
    receiver = WeightReceiver(sig, engine.load_bucket, bucket_bytes=256)
    seen = []
    sent = sender.send(lambda b, handle: seen.append(receiver.load_bucket(b, handle)), group=None)
    assert len(seen) == len(sender.buckets) == len(sent["fingerprints"]) > 1 and sum(seen) == sent["bytes"]
    for a, b in zip(src.parameters(), dst.parameters()):
        assert b.dtype == torch.float64 and torch.equal(a.double(), b)
    receiver.verify(sent["fingerprints"], "rollout-0")  # read back from float64, in the sender's float32


def test_receiver_refuses_other_shapes():
    sig = param_signature(_model(0).named_parameters())
    other = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 5))
    with pytest.raises(RuntimeError, match="rollout-3: parameters differ"):
        HFDecodeEngine(other).check_signature(sig, "rollout-3")


def _distinct(i: int, p: torch.Tensor) -> torch.Tensor:
    """Values unique to parameter i and to each of its elements: a bucket sliced at the wrong offset or a
    parameter sent in another's place shows."""
    return (torch.arange(p.numel(), dtype=torch.float32) * 1e-6 + i).view(p.shape)


def _proc(rank: int, dp_port: int, sync_port: int, model_dir: str, q) -> None:
    """Ranks 0 and 1: a ZeRO-3 learner pair (gloo data-parallel group); rank 2: a rollout process."""
    import os

    from rlhf_dist.models.load import load_causal_lm
    from rlhf_dist.roles.weight_sync import Broadcast

    torch.set_num_threads(1)
    model = load_causal_lm(model_dir)
    if rank < 2:
        import torch.distributed as dist

        from rlhf_dist.runtime.distributed import init_local_group_env, make_engine

        with torch.no_grad():
            for i, p in enumerate(model.parameters()):
                p.copy_(_distinct(i, p))
        init_local_group_env(rank, 2, "127.0.0.1", dp_port)
        dist.init_process_group("gloo", rank=rank, world_size=2)
        engine = make_engine(model, lr=1e-3, total_steps=1, warmup_steps=0, micro_batch=1, grad_accum=1,
                             zero_stage=3, grad_clip=1.0, bf16=False)
        assert all(p.numel() == 0 for p in engine.module.parameters())  # partitions, not weights
        sender = WeightSender(engine.module.named_parameters(), rank, zero3=True, bucket_bytes=1 << 16)
        group = Broadcast("127.0.0.1", sync_port, 0, 2, "gloo", 60) if rank == 0 else None
        sig = param_signature(engine.module.named_parameters())
        sent = sender.send(None, group)
        q.put((rank, sent, sig, None))
        q.close()
        q.join_thread()  # flushed before the hard exit below
        os._exit(0)  # DeepSpeed's process group needs no orderly teardown here
    sig = [(n, tuple(p.shape), str(p.dtype)) for n, p in model.named_parameters()]
    receiver = WeightReceiver(sig, HFDecodeEngine(model).load_bucket, bucket_bytes=1 << 16)
    moved = receiver.receive(Broadcast("127.0.0.1", sync_port, 1, 2, "gloo", 60))
    exact = all(torch.equal(p, _distinct(i, p)) for i, p in enumerate(model.parameters()))
    q.put((rank, moved, len(receiver.buckets), (exact, dict(receiver.landed))))


def test_zero3_learners_gather_and_broadcast_over_gloo(tiny):
    from rlhf_dist.roles.calls import free_port

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    ports = (free_port(), free_port())
    procs = [ctx.Process(target=_proc, args=(r, *ports, str(tiny["model"]), q)) for r in range(3)]
    for p in procs:
        p.start()
    results = {r[0]: r for r in (q.get(timeout=120) for _ in procs)}
    for p in procs:
        p.join(30)
    (_, sent, sig, _), (_, none_sent, _, _), (_, got, n_buckets, (exact, landed)) = results[0], results[1], results[2]
    assert sent["bytes"] == got > 0 and none_sent == {"bytes": 0, "fingerprints": []}  # rank 1: the gathers only
    assert all(len(s) for _, s, _ in sig)  # the signature has the full shapes (ds_shape), not empty partitions
    assert 1 < n_buckets < len(sig)
    assert exact  # every element of every parameter, not one per parameter
    assert [landed[b] for b in range(n_buckets)] == [tuple(f) for f in sent["fingerprints"]]


# ---------------------------------------------------------------------------------------
# Verified syncs: fingerprints, the order of arrival, IPC handles
# ---------------------------------------------------------------------------------------

def test_fingerprint_is_exact_and_position_sensitive():
    x = torch.randn(1001)  # an odd byte count in bf16 below: padded to whole words
    assert fingerprint(x) == fingerprint(x.clone())
    swapped = x.clone()
    swapped[[3, 700]] = swapped[[700, 3]]
    flipped = x.clone()
    flipped.view(torch.int32)[500] ^= 1  # one bit of the mantissa
    assert len({fingerprint(x), fingerprint(swapped), fingerprint(flipped)}) == 3
    assert fingerprint(x.bfloat16()) != fingerprint(x.bfloat16().flip(0))


def _synced_pair(bucket_bytes=256):
    src, dst = _model(0), _model(1)
    sig = param_signature(src.named_parameters())
    return (WeightSender(src.named_parameters(), rank=0, zero3=False, bucket_bytes=bucket_bytes),
            WeightReceiver(sig, HFDecodeEngine(dst).load_bucket, bucket_bytes=bucket_bytes))


def test_a_sync_finished_before_its_buckets_arrived_is_an_error():
    """Review item 1.2's bug: an IPC worker that switched versions when the sync started, before the
    learner's buckets reached it. Its check at the switch finds bucket 0 missing."""
    sender, receiver = _synced_pair()
    handles = []
    sent = sender.send(lambda b, h: handles.append((b, h)), group=None)  # in flight, not yet loaded
    with pytest.raises(SyncError, match=r"rollout-0: weight sync bucket 0 of \d+ \(from 0.weight\) never arrived"):
        receiver.verify(sent["fingerprints"], "rollout-0")
    for b, h in handles:
        receiver.load_bucket(b, h)
    receiver.verify(sent["fingerprints"], "rollout-0")


def test_a_corrupted_bucket_is_named():
    sender, receiver = _synced_pair()

    def deliver(b, flat):
        receiver.load_bucket(b, flat * 2 if b == 1 else flat)  # bucket 1 changed on the way

    sent = sender.send(deliver, group=None)
    with pytest.raises(SyncError, match=r"bucket 1 of \d+ \(from [\w.]+\) arrived with fingerprint"):
        receiver.verify(sent["fingerprints"], "rollout-0")


def test_open_ipc_sets_the_device_where_torch_rebuild_takes_it():
    """`open_ipc` reads the device argument's place from torch's own `rebuild_cuda_tensor`'s signature and
    leaves the rest of the handle (shape, stride, offset, dtype, storage handle) as it is."""
    import inspect

    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    names = list(inspect.signature(rebuild_cuda_tensor).parameters)
    got = {}

    def rebuild(*args):  # torch's argument layout, recorded instead of opened (no GPU here)
        got.update(zip(names, args))
        return "tensor"

    rebuild.__signature__ = inspect.signature(rebuild_cuda_tensor)
    args = [f"arg{i}" for i in range(len(names))]
    args[names.index("storage_device")] = 5  # the sender's index, in its own CUDA_VISIBLE_DEVICES
    args[names.index("dtype")], args[names.index("tensor_offset")] = torch.bfloat16, 128
    assert open_ipc((rebuild, tuple(args)), device_index=0) == "tensor"
    assert got["storage_device"] == 0 and got["dtype"] is torch.bfloat16 and got["tensor_offset"] == 128
    assert all(got[n] == a for n, a in zip(names, args) if n not in ("storage_device", "dtype", "tensor_offset"))


@pytest.fixture
def ray_with_tests():
    """A local Ray whose workers import this module (its actors below use its helpers)."""
    from pathlib import Path

    import ray

    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", configure_logging=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(Path(__file__).parent)}})
    yield
    ray.shutdown()


def test_the_driver_switches_versions_only_after_every_ipc_bucket_landed(ray_with_tests):
    """sync_weights with the real order of arrival: the learner's send hands each bucket to the rollout
    actor by its own remote calls (as `Learner.send_weights` does by IPC), slowly; the rollout worker's
    finish_sync (check + switch) must come after the last of them, and its check must pass."""
    import types

    import ray

    from rlhf_dist.online.setup import sync_weights

    @ray.remote
    class Rollout:
        def __init__(self):
            self.calls, self.receiver = [], _synced_pair()[1]

        def receive_weights(self):
            self.calls.append("receive")
            return 0

        def load_bucket(self, b, flat):
            self.calls.append(f"load {b}")
            return self.receiver.load_bucket(b, flat)

        def finish_sync(self, version, fingerprints):
            self.receiver.verify(fingerprints, "rollout-0")
            self.calls.append(f"finish {version}")

        def log(self):
            return self.calls

    @ray.remote
    class Learner:
        def __init__(self, rollout):
            self.rollout = rollout

        def send_weights(self):
            import time

            def deliver(b, flat):
                time.sleep(0.2)  # the buckets arrive well after the driver's other calls
                ray.get(self.rollout.load_bucket.remote(b, flat))
            return _synced_pair()[0].send(deliver, None)

    rollout = Rollout.remote()
    roles = types.SimpleNamespace(policy=[Learner.remote(rollout)], rollout=[rollout])
    assert sync_weights(types.SimpleNamespace(sync_timeout_s=60), roles, 3) > 0
    calls = ray.get(rollout.log.remote())
    n = len(_synced_pair()[0].buckets)
    assert calls.index("finish 3") > max(calls.index(f"load {b}") for b in range(n)), calls
