"""Weight sync on CPU: the transport rule (pure), buckets, the IPC receiver's bucket protocol, and the
broadcast from a ZeRO-3 learner pair (gathers over gloo) into a rollout process."""

import multiprocessing as mp

import pytest
import torch

from rlhf_dist.errors import PlacementError
from rlhf_dist.roles.weight_sync import DeviceId, WeightReceiver, WeightSender, make_buckets, param_signature, plan_sync
from rlhf_dist.rollout.engine import HFDecodeEngine

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
    moved = sender.send(lambda b, handle: seen.append(receiver.load_bucket(b, handle)), group=None)
    assert len(seen) == len(sender.buckets) > 1 and sum(seen) == moved
    for a, b in zip(src.parameters(), dst.parameters()):
        assert b.dtype == torch.float64 and torch.equal(a.double(), b)


def test_receiver_refuses_other_shapes():
    sig = param_signature(_model(0).named_parameters())
    other = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 5))
    with pytest.raises(RuntimeError, match="rollout-3: parameters differ"):
        HFDecodeEngine(other).check_signature(sig, "rollout-3")


def _proc(rank: int, dp_port: int, sync_port: int, model_dir: str, q) -> None:
    """Ranks 0 and 1: a ZeRO-3 learner pair (gloo data-parallel group); rank 2: a rollout process."""
    import os

    from rlhf_dist.models import load_causal_lm
    from rlhf_dist.roles.weight_sync import Broadcast

    torch.set_num_threads(1)
    model = load_causal_lm(model_dir)
    if rank < 2:
        import torch.distributed as dist

        from rlhf_dist.distributed import init_local_group_env, make_engine

        with torch.no_grad():
            for i, p in enumerate(model.parameters()):
                p.fill_(i * 0.01)
        init_local_group_env(rank, 2, "127.0.0.1", dp_port)
        dist.init_process_group("gloo", rank=rank, world_size=2)
        engine = make_engine(model, lr=1e-3, total_steps=1, warmup_steps=0, micro_batch=1, grad_accum=1,
                             zero_stage=3, grad_clip=1.0, bf16=False)
        assert all(p.numel() == 0 for p in engine.module.parameters())  # partitions, not weights
        sender = WeightSender(engine.module.named_parameters(), rank, zero3=True, bucket_bytes=1 << 16)
        group = Broadcast("127.0.0.1", sync_port, 0, 2, "gloo", 60) if rank == 0 else None
        sig = param_signature(engine.module.named_parameters())
        moved = sender.send(None, group)
        q.put((rank, moved, sig, None))
        q.close()
        q.join_thread()  # flushed before the hard exit below
        os._exit(0)  # DeepSpeed's process group needs no orderly teardown here
    sig = [(n, tuple(p.shape), str(p.dtype)) for n, p in model.named_parameters()]
    receiver = WeightReceiver(sig, HFDecodeEngine(model).load_bucket, bucket_bytes=1 << 16)
    moved = receiver.receive(Broadcast("127.0.0.1", sync_port, 1, 2, "gloo", 60))
    q.put((rank, moved, len(receiver.buckets), [float(p.flatten()[0]) for p in model.parameters()]))


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
    (_, sent, sig, _), (_, none_sent, _, _), (_, got, n_buckets, firsts) = results[0], results[1], results[2]
    assert sent == got > 0 and none_sent == 0  # rank 1 only took part in the gathers
    assert all(len(s) for _, s, _ in sig)  # the signature has the full shapes (ds_shape), not empty partitions
    assert 1 < n_buckets < len(firsts)
    assert [round(x, 6) for x in firsts] == [round(i * 0.01, 6) for i in range(len(firsts))]
