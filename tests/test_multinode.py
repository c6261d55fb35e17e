"""A real two-node Ray cluster on loopback: doctor on it, then the whole pipeline submitted as a Ray job.

Both nodes are `ray start --block` processes this module starts, each in its own process group, and
stops by those process groups only (never `ray stop`: other Ray instances may share this machine).
The roles are pinned to nodes with custom resources (node_a on the head, node_b on the worker), and
the job's "role X-N on node ID" log lines must show each role on the node it was pinned to.
The cluster uses its own token (Ray's token authentication stays on, as it comes).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import base_config, iteration_rows

from rlhf_dist.io.checkpoint import is_complete

pytestmark = [pytest.mark.timeout(600), pytest.mark.slow]

BIN = Path(sys.executable).parent  # the venv's bin: ray, rlhf-dist
PIN = {"rollout": "a", "policy": "a", "reference": "a", "critic": "b", "reward": "b"}
JOB_TIMEOUT_S = 420  # ~105 s on an idle 2-core machine, ~250 s while other test suites run beside it

# The dashboard, job server and job SDK are in ray[default], not in ray[train].
needs_ray_default = pytest.mark.skipif(importlib.util.find_spec("aiohttp") is None,
                                       reason="the Ray job server needs ray[default] (pip install 'ray[default]')")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _nodes(env: dict) -> list[dict]:
    """The cluster's nodes, read by a short-lived driver in a subprocess (keeps Ray out of the test process)."""
    code = ("import json, ray; ray.init(address=__import__('os').environ['RAY_ADDRESS'], logging_level='ERROR'); "
            "print('NODES=' + json.dumps([{'id': n['NodeID'], 'alive': n['Alive'], 'ip': n['NodeManagerAddress'], "
            "'resources': n['Resources']} for n in ray.nodes()]))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=90)
    line = next((l for l in out.stdout.splitlines() if l.startswith("NODES=")), None)
    if line is None:
        raise RuntimeError(f"could not list nodes (rc {out.returncode}): {out.stderr[-2000:]}")
    return json.loads(line[len("NODES="):])


def _stop(procs: list[subprocess.Popen]) -> None:
    """SIGTERM each process group we started, wait, then SIGKILL what is left: ours only, by pgid."""
    for p in procs:
        try:
            os.killpg(p.pid, signal.SIGTERM)  # start_new_session: pgid == the Popen's pid
        except ProcessLookupError:
            pass
    deadline = time.time() + 45  # Ray drains a node for up to 30 s on SIGTERM
    for p in procs:
        try:
            p.wait(max(1.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            pass
    for p in procs:
        try:
            os.killpg(p.pid, signal.SIGKILL)  # the group may outlive its leader (raylet, workers)
        except ProcessLookupError:
            pass
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            pass


@pytest.fixture(scope="module")
def cluster():
    """Head (node_a) + worker (node_b), 2 logical CPUs each, all ports on loopback and chosen free."""
    tmp = tempfile.mkdtemp(prefix="rmn", dir="/tmp")  # short: Ray's unix socket paths must fit 107 bytes
    token = secrets.token_hex(32)
    gcs, dash = _free_port(), _free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH")}
    env.update(PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", RAY_USAGE_STATS_ENABLED="0",
               WANDB_MODE="disabled", RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token,
               RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",  # nothing to drain here: stop in seconds, not 30
               RAY_TRAIN_ENABLE_CONTROLLER_STRUCTURED_LOGGING="0", RAY_TRAIN_ENABLE_WORKER_STRUCTURED_LOGGING="0")
    # Each node its own temp dir, as on real machines: with one shared dir, both nodes' runtime-env agents
    # manage the same unpacked working_dir, and one deleted it under the running job's driver.
    common = ["--node-ip-address=127.0.0.1", "--num-cpus=2", "--object-store-memory=300000000",
              "--disable-usage-stats", "--block"]
    procs: list[subprocess.Popen] = []
    logs = {name: Path(tmp, f"{name}.log") for name in ("head", "worker")}
    try:
        procs.append(subprocess.Popen(
            [str(BIN / "ray"), "start", "--head", f"--port={gcs}", '--resources={"node_a": 10}',
             "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", f"--temp-dir={tmp}/a",
             f"--dashboard-agent-listen-port={_free_port()}", f"--ray-client-server-port={_free_port()}", *common],
            env=env, cwd=tmp, stdout=logs["head"].open("w"), stderr=subprocess.STDOUT, start_new_session=True))
        # The worker joins through the head's GCS; give the head a head start so the GCS is listening.
        info = dict(env, RAY_ADDRESS=f"127.0.0.1:{gcs}")
        t0 = time.time()
        while time.time() - t0 < 90:
            if procs[0].poll() is not None:
                pytest.fail(f"ray start --head exited {procs[0].returncode}:\n{logs['head'].read_text()[-3000:]}")
            if "Ray runtime started" in logs["head"].read_text():
                break
            time.sleep(0.5)
        procs.append(subprocess.Popen(
            [str(BIN / "ray"), "start", f"--address=127.0.0.1:{gcs}", '--resources={"node_b": 10}',
             f"--dashboard-agent-listen-port={_free_port()}", f"--temp-dir={tmp}/b", *common],
            env=env, cwd=tmp, stdout=logs["worker"].open("w"), stderr=subprocess.STDOUT, start_new_session=True))
        nodes: list[dict] = []
        while time.time() - t0 < 150:
            for p, name in zip(procs, ("head", "worker")):
                if p.poll() is not None:
                    pytest.fail(f"ray start ({name}) exited {p.returncode}:\n{logs[name].read_text()[-3000:]}")
            try:
                nodes = [n for n in _nodes(info) if n["alive"]]
            except (RuntimeError, subprocess.TimeoutExpired):
                nodes = []
            if len(nodes) == 2:
                break
            time.sleep(1)
        else:
            pytest.fail(f"2 alive nodes not seen in 150 s (got {nodes});\nhead:\n{logs['head'].read_text()[-2000:]}"
                        f"\nworker:\n{logs['worker'].read_text()[-2000:]}")
        letter = {n["id"]: ("a" if "node_a" in n["resources"] else "b") for n in nodes}
        print(f"\ncluster up in {time.time() - t0:.1f}s: " +
              ", ".join(f"node {k} = {i[:12]} ({n['ip']})" for i, k in letter.items() for n in nodes if n["id"] == i))
        yield {"gcs": f"127.0.0.1:{gcs}", "dashboard": f"http://127.0.0.1:{dash}", "env": info, "token": token,
               "letter": letter, "tmp": tmp}
    finally:
        _stop(procs)
        for p in procs:  # killed members linger as zombies until reaped: give them a moment
            for _ in range(50):
                try:
                    os.killpg(p.pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.2)
            else:
                print(f"WARNING: process group {p.pid} still has members 10 s after SIGKILL")
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def run_config(tiny, tmp_path_factory):
    """A short pipeline (absolute paths) with the PPO roles pinned to the two nodes by custom resources."""
    save = tmp_path_factory.mktemp("multinode") / "run"
    roles = {role: {"num_cpus": 0.3, "resources": {f"node_{node}": 1}} for role, node in PIN.items()}
    cfg = base_config(tiny, save, sft_epochs=1, sft_batch_size=32, reward_epochs=1, ppo_iterations=2,
                      ppo_batch_size=8, ppo_mini_batch_size=4, gen_max_new_tokens=8, max_length=64, save_interval=1,
                      sft_workers=1, train_cpus_per_worker=1, call_timeout_s=300, roles=roles,
                      wandb={"mode": "disabled"})
    path = save.parent / "multinode.json"
    path.write_text(json.dumps(cfg, indent=1))
    return path, save


@needs_ray_default
def test_doctor_on_two_nodes(cluster, run_config):
    """`rlhf-dist doctor` against the running cluster: both nodes listed, each pinned role fits its node."""
    path, _ = run_config
    out = subprocess.run([str(BIN / "rlhf-dist"), "doctor", str(path)], env=cluster["env"], capture_output=True,
                         text=True, timeout=180)
    print("\n--- rlhf-dist doctor on the two-node cluster ---\n" + out.stdout + out.stderr)
    assert out.returncode == 0, out.stderr
    for node_id in cluster["letter"]:
        assert node_id[:12] in out.stdout
    for role, node in PIN.items():
        node_id = next(i for i, k in cluster["letter"].items() if k == node)
        assert re.search(rf"{role}-0\s+-> node {node_id[:12]}", out.stdout), role
    # a role asking for a resource no node has: exit 3, naming the role and the resource
    bad = subprocess.run([str(BIN / "rlhf-dist"), "doctor", str(path), "roles.critic.resources={node_c: 1}"],
                         env=cluster["env"], capture_output=True, text=True, timeout=180)
    assert bad.returncode == 3, bad.stdout + bad.stderr
    assert "critic-0" in bad.stderr and "node_c" in bad.stderr


@needs_ray_default
def test_pipeline_job_on_two_nodes(cluster, run_config):
    """`rlhf-dist run` submitted through the job server: succeeds, writes the layout, roles on both nodes."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    path, save = run_config
    # The token goes in the header: this process may hold another cluster's token from an earlier ray.init.
    client = JobSubmissionClient(cluster["dashboard"], headers={"Authorization": f"Bearer {cluster['token']}"})
    t0 = time.time()
    job = client.submit_job(entrypoint=f"{BIN / 'rlhf-dist'} run {path}")
    status = client.get_job_status(job)
    while status not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED) and time.time() - t0 < JOB_TIMEOUT_S:
        time.sleep(2)
        status = client.get_job_status(job)
    wall = time.time() - t0
    logs = client.get_job_logs(job)
    if status != JobStatus.SUCCEEDED:
        if status == JobStatus.RUNNING:
            client.stop_job(job)
        print(f"\n--- job {job} logs ---\n{logs[-20000:]}")
        pytest.fail(f"job {job}: {status} after {wall:.0f}s")

    for d in ("sft/best_model", "reward_model/best_model", "ppo/iteration_000001", "ppo/final_model"):
        assert is_complete(save / d), d
    assert (save / "config.json").is_file()
    rows = iteration_rows(save)
    assert len(rows) == 2 and all("rm_score" in r for r in rows)  # PPO scored with the trained reward model

    placed = {(m[1], int(m[2])): (m[3], int(m[4]))
              for m in re.finditer(r"role (\w+)-(\d+) on node ([0-9a-f]{12}) pid (\d+)", logs)}
    by_prefix = {i[:12]: k for i, k in cluster["letter"].items()}
    print(f"\n{'role':<10} {'rank':>4}  node  {'node id':<12}  pid")
    for (role, rank), (node, pid) in sorted(placed.items(), key=lambda kv: list(PIN).index(kv[0][0])):
        print(f"{role:<10} {rank:>4}  {by_prefix.get(node, '?'):<4}  {node:<12}  {pid}")
    print(f"job {job}: {status} in {wall:.1f}s")
    assert {r for r, _ in placed} == set(PIN), placed
    for (role, _), (node, _) in placed.items():
        assert by_prefix.get(node) == PIN[role], f"{role} ran on node {node}, pinned to node_{PIN[role]}"
    assert set(by_prefix[n] for n, _ in placed.values()) == {"a", "b"}

    # scripts/submit.sh, for real: uploads this checkout, submits `rlhf-dist run`; every stage of the
    # same save_dir is complete now, so the job only checks and skips them.
    env = dict(cluster["env"], RAY_BIN=str(BIN / "ray"))
    out = subprocess.run(["bash", str(Path(__file__).parents[1] / "scripts" / "submit.sh"), str(path),
                          cluster["dashboard"]], env=env, capture_output=True, text=True, timeout=120)
    print(f"\n--- scripts/submit.sh ---\n{out.stdout}{out.stderr[-2000:]}")
    assert out.returncode == 0, out.stderr
    sub = re.search(r"submission id: (raysubmit_\w+)", out.stdout)
    assert sub and f"ray job logs --address {cluster['dashboard']} --follow {sub[1]}" in out.stdout
    t0 = time.time()
    while (status := client.get_job_status(sub[1])) not in (JobStatus.SUCCEEDED, JobStatus.FAILED,
                                                           JobStatus.STOPPED) and time.time() - t0 < 120:
        time.sleep(2)
    logs = client.get_job_logs(sub[1])
    assert status == JobStatus.SUCCEEDED, logs[-5000:]
    assert "sft: already complete" in logs and "ppo: already complete" in logs, logs[-5000:]
    print(f"submit.sh job {sub[1]}: {status} in {time.time() - t0:.1f}s (all stages already complete)")


def test_cluster_files_validate():
    """The launcher YAML passes Ray's schema and cross-field checks; the RayJob has what the run needs."""
    pytest.importorskip("jsonschema")
    root = Path(__file__).parents[1]
    out = subprocess.run([sys.executable, str(root / "cluster" / "validate.py")], capture_output=True, text=True,
                         timeout=120)
    print(out.stdout)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count(": ok") == 3

    # ...and the schema check does reject a bad launcher config (an unknown top-level field, a wrong type)
    import jsonschema
    import yaml

    spec = importlib.util.spec_from_file_location("cluster_validate", root / "cluster" / "validate.py")
    validate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(validate)
    good = yaml.safe_load((root / "cluster" / "aws-gpu.yaml").read_text())
    for bad in ({**good, "max_worker": 4}, {**good, "max_workers": "four"}):
        path = Path(tempfile.mkdtemp()) / "bad.yaml"
        path.write_text(yaml.safe_dump(bad))
        with pytest.raises(jsonschema.ValidationError):
            validate.check_aws(path)
        shutil.rmtree(path.parent)
