"""Offline checks of the cluster files: `python cluster/validate.py` (exit 0 = all good).

- aws-gpu.yaml: Ray's own launcher path, minus the cloud: `prepare_config` (merge the AWS defaults) and
  `validate_config` (Ray's JSON schema ray/autoscaler/ray-schema.json + its cross-field checks).
  `ray up` has no dry-run, and the rest of it needs boto3 and AWS credentials.
- kuberay-rayjob.yaml: no KubeRay CRD schema is available offline (and `kubectl --dry-run=client`
  needs an API server for a custom resource), so this checks the structure the job depends on.
- configs/examples/cluster.yaml (the config both run) loads and its placement plan needs GPUs.
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def check_aws(path: Path) -> list[str]:
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load(path.read_text())
    cfg = prepare_config(raw)
    validate_config(cfg)  # raises jsonschema.ValidationError / ValueError
    errors = []
    head = " ".join(raw["head_start_ray_commands"])
    if "--dashboard-host=127.0.0.1" not in head:
        errors.append("aws: the head must start the dashboard on 127.0.0.1")
    if "RAY_AUTH_MODE=token" not in head or "RAY_AUTH_MODE=token" not in " ".join(raw["worker_start_ray_commands"]):
        errors.append("aws: every node must start with RAY_AUTH_MODE=token")
    if not any("pip install" in c and "-e" in c for c in cfg["worker_setup_commands"]):
        errors.append("aws: worker nodes must install the project")
    return errors


def check_rayjob(path: Path) -> list[str]:
    doc = yaml.safe_load(path.read_text())
    errors = []

    def need(cond, msg):
        if not cond:
            errors.append(f"rayjob: {msg}")

    need(doc.get("apiVersion") == "ray.io/v1" and doc.get("kind") == "RayJob", "apiVersion ray.io/v1, kind RayJob")
    spec = doc.get("spec", {})
    argv = shlex.split(spec.get("entrypoint", ""))
    need(argv[:2] == ["rlhf-dist", "run"] and len(argv) >= 3, "entrypoint: rlhf-dist run CONFIG")
    if len(argv) >= 3:
        need((ROOT / argv[2]).is_file(), f"entrypoint config {argv[2]} not in the repository")
    need(spec.get("shutdownAfterJobFinishes") is True, "shutdownAfterJobFinishes: true")
    runtime_env = yaml.safe_load(spec.get("runtimeEnvYAML", "")) or {}
    need(isinstance(runtime_env, dict) and "working_dir" in runtime_env, "runtimeEnvYAML with working_dir")
    entry_res = json.loads(spec.get("entrypointResources", "{}"))
    cluster = spec.get("rayClusterSpec", {})
    need("headGroupSpec" in cluster and cluster.get("workerGroupSpecs"), "rayClusterSpec with head and worker groups")
    groups = [cluster.get("headGroupSpec", {}), *cluster.get("workerGroupSpecs", [])]
    offered: dict[str, float] = {}
    for g in groups:
        params = g.get("rayStartParams", {})
        # KubeRay's rayStartParams is map[string]string: a number or bool here fails the CRD
        need(all(isinstance(v, str) for v in params.values()), f"rayStartParams values must be strings: {params}")
        if "resources" in params:
            offered.update(json.loads(params["resources"].strip().strip('"').replace('\\"', '"')))
        for c in g.get("template", {}).get("spec", {}).get("containers", []):
            env = {e["name"]: e for e in c.get("env", [])}
            need(env.get("RAY_AUTH_MODE", {}).get("value") == "token" and "RAY_AUTH_TOKEN" in env,
                 f"container {c.get('name')}: RAY_AUTH_MODE=token and RAY_AUTH_TOKEN")
    gpu_groups = [g for g in cluster.get("workerGroupSpecs", [])
                  if any("nvidia.com/gpu" in c.get("resources", {}).get("limits", {})
                         for c in g["template"]["spec"]["containers"])]
    need(gpu_groups, "a worker group with nvidia.com/gpu limits")
    need(all(offered.get(k, 0) >= v for k, v in entry_res.items()),
         f"entrypointResources {entry_res} not offered by any group ({offered})")
    sub = spec.get("submitterPodTemplate", {}).get("spec", {}).get("containers", [{}])[0]
    need("RAY_AUTH_TOKEN" in {e["name"] for e in sub.get("env", [])}, "the submitter pod needs RAY_AUTH_TOKEN")
    return errors


def check_run_config(path: Path) -> list[str]:
    from rlhf_dist.config import load_config
    from rlhf_dist.roles.placement import plan_placement

    cfg = load_config(path)
    bundles, _ = plan_placement(cfg, 8)
    return [] if all(b.get("GPU") for b in bundles) else [f"{path.name}: every PPO bundle should have a GPU"]


def main() -> int:
    failed = False
    for name, fn, path in (("cluster/aws-gpu.yaml", check_aws, ROOT / "cluster/aws-gpu.yaml"),
                           ("cluster/kuberay-rayjob.yaml", check_rayjob, ROOT / "cluster/kuberay-rayjob.yaml"),
                           ("configs/examples/cluster.yaml", check_run_config, ROOT / "configs/examples/cluster.yaml")):
        try:
            errors = fn(path)
        except Exception as e:  # noqa: BLE001 - report which file and why, then go on
            errors = [f"{type(e).__name__}: {e}"]
        print(f"{name}: {'ok' if not errors else 'FAILED'}")
        for e in errors:
            print(f"  {e}")
        failed |= bool(errors)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
