"""Infrastructure files (ray_cluster.yaml, infra/) and the local stack (infra/local/stack.sh).

- ``ray_cluster.yaml`` validates against the JSON schema Ray ships and Ray's own config checks.
- One test reads every manifest (Ray launcher, KubeRay with each kustomize overlay rendered, the
  MLflow compose file, the Dockerfile, the docs) and checks they name the same image, entrypoint and
  resources.
- No secret is written into any of them.
- The local stack starts a Ray head, moto's S3 server and an MLflow server, reports them healthy,
  serves an MLflow artifact into moto's S3, and stops leaving no process behind.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml

from fractalgen.config import TrainRunConfig, load
from fractalgen.platform.cluster import ENTRYPOINT, IMAGE, IMAGE_REPOSITORY, NODE_TYPES

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"
KUBERAY = INFRA / "kuberay"
STACK = INFRA / "local" / "stack.sh"
SIZES = ("fractalmar-base-in256", "fractalmar-large-in256", "fractalmar-huge-in256")


# ----------------------------------------------------------------------------------------------------
# helpers: a minimal kustomize (resources + JSON 6902 patches, which is all infra/kuberay uses)
# ----------------------------------------------------------------------------------------------------


def _apply_json_patch(doc: dict, ops: list[dict]) -> dict:
    doc = copy.deepcopy(doc)
    for op in ops:
        assert op["op"] in ("replace", "add"), f"unsupported patch op {op}"
        parts = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].lstrip("/").split("/")]
        node: Any = doc
        for part in parts[:-1]:
            node = node[int(part)] if isinstance(node, list) else node[part]
        last = parts[-1]
        if isinstance(node, list):
            if op["op"] == "replace":
                node[int(last)] = op["value"]
            else:
                node.insert(len(node) if last == "-" else int(last), op["value"])
        else:
            if op["op"] == "replace":
                assert last in node, f"replace of a missing path {op['path']}"
            node[last] = op["value"]
    return doc


def render_kustomization(folder: Path) -> list[dict]:
    """The objects ``kubectl kustomize folder`` would print (for the features infra/kuberay uses)."""
    kust = yaml.safe_load((folder / "kustomization.yaml").read_text())
    assert set(kust) <= {"apiVersion", "kind", "resources", "patches"}, (
        f"{folder}: unsupported kustomize keys"
    )
    objects: list[dict] = []
    for res in kust.get("resources", []):
        path = (folder / res).resolve()
        assert path.exists(), f"{folder}/kustomization.yaml names a missing resource {res}"
        if path.is_dir():
            objects.extend(render_kustomization(path))
        else:
            objects.extend(d for d in yaml.safe_load_all(path.read_text()) if d)
    for patch in kust.get("patches", []):
        target, ops = patch["target"], yaml.safe_load(patch["patch"])
        hits = 0
        for i, obj in enumerate(objects):
            if obj["kind"] == target["kind"] and obj["metadata"]["name"] == target.get(
                "name", obj["metadata"]["name"]
            ):
                objects[i] = _apply_json_patch(obj, ops)
                hits += 1
        assert hits == 1, f"{folder}: patch target {target} matched {hits} objects"
    return objects


def _containers(spec: dict) -> list[dict]:
    return spec["template"]["spec"]["containers"]


def _ray_cluster_spec(obj: dict) -> dict:
    return obj["spec"]["rayClusterSpec"] if obj["kind"] == "RayJob" else obj["spec"]


def _ray_cluster_config() -> dict:
    return yaml.safe_load((REPO / "ray_cluster.yaml").read_text())


# ----------------------------------------------------------------------------------------------------
# manifests
# ----------------------------------------------------------------------------------------------------


def test_ray_cluster_yaml_passes_rays_schema() -> None:
    import jsonschema
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = _ray_cluster_config()
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)  # the schema Ray ships
    validate_config(config)  # Ray's checks on top (head type, worker bounds)
    validate_config(prepare_config(copy.deepcopy(config)))  # after Ray fills in its defaults


def _find_key(node: Any, key: str) -> list[Any]:
    """Every value stored under ``key`` anywhere in a parsed YAML tree."""
    if isinstance(node, dict):
        found = [node[key]] if key in node else []
        return found + [v for child in node.values() for v in _find_key(child, key)]
    if isinstance(node, list):
        return [v for child in node for v in _find_key(child, key)]
    return []


def test_ray_cluster_nodes_stay_in_our_security_group() -> None:
    from ray.autoscaler._private.aws.config import (
        _configure_from_network_interfaces,
        _configure_security_group,
    )

    config = _ray_cluster_config()
    head = config["available_node_types"][config["head_node_type"]]["node_config"]
    groups = head["SecurityGroupIds"]
    assert groups and all(isinstance(g, str) and g.startswith("sg-") for g in groups), groups
    assert head["SubnetIds"], "the head is placed in the (private) subnet"
    workers = [
        t["node_config"] for k, t in config["available_node_types"].items() if k != config["head_node_type"]
    ]
    assert workers
    for nc in workers:
        # With NetworkInterfaces, AWS (and Ray) take subnet and groups only per interface.
        assert not {"SecurityGroupIds", "SubnetId", "SubnetIds"} & set(nc), sorted(nc)
        for nic in nc["NetworkInterfaces"]:
            # the head's group: GCS/object manager ports and EFA traffic stay inside it
            assert nic["Groups"] == groups, nic
            assert nic["SubnetId"] and nic.get("AssociatePublicIpAddress") is not True, nic
    assert config["provider"]["use_internal_ips"] is True
    assert True not in _find_key(config, "AssociatePublicIpAddress"), "a node asks for a public IP"
    assert not re.search(r"AssociatePublicIpAddress:\s*true", (REPO / "ray_cluster.yaml").read_text(), re.I)
    # Ray's own bootstrap step: a node type without groups would get a Ray-made security group (SSH
    # open to 0.0.0.0/0); here every type has ours, so it creates none (and calls no AWS API).
    prepared = _configure_security_group(_configure_from_network_interfaces(config))
    for name, node_type in prepared["available_node_types"].items():
        assert set(node_type["node_config"]["SecurityGroupIds"]) == set(groups), name


def test_manifests_reference_image_entrypoint_and_resources_consistently() -> None:
    ray_version = __import__("ray").__version__
    node = NODE_TYPES["p5.48xlarge"]

    # --- Ray cluster launcher (AWS)
    rc = _ray_cluster_config()
    assert rc["docker"]["image"] == IMAGE
    head = rc["available_node_types"][rc["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0, "the head node is CPU only"
    (worker_type,) = [v for k, v in rc["available_node_types"].items() if k != rc["head_node_type"]]
    nc = worker_type["node_config"]
    assert nc["InstanceType"] == node.name
    assert worker_type["resources"]["GPU"] == node.gpus
    assert 0 == worker_type["min_workers"] < worker_type["max_workers"] <= rc["max_workers"]
    nics = nc["NetworkInterfaces"]
    assert len(nics) == 32 and sorted(n["NetworkCardIndex"] for n in nics) == list(range(32))
    assert nics[0]["InterfaceType"] == "efa" and nics[0]["DeviceIndex"] == 0
    assert all(n["InterfaceType"] in ("efa", "efa-only") and n["DeviceIndex"] == 1 for n in nics[1:])
    assert "GroupName" in nc["Placement"]  # EFA: one cluster placement group
    worker_opts = " ".join(rc["docker"]["worker_run_options"])
    assert "--device=/dev/infiniband" in worker_opts and "memlock=-1" in worker_opts
    shm = re.search(r"--shm-size=(\d+)g", worker_opts)
    assert shm and int(shm.group(1)) >= 256, "large shared memory on the GPU workers"
    assert rc["provider"]["use_internal_ips"] is True
    head_start = " ".join(rc["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start and "0.0.0.0" not in head_start
    env_opts = " ".join(rc["docker"]["run_options"])
    assert "MLFLOW_TRACKING_URI=" in env_opts and "--env-file" in env_opts

    # --- KubeRay: the standing cluster and every size's RayJob, rendered as kustomize would
    rendered = {
        "cluster": render_kustomization(KUBERAY / "cluster"),
        "job": render_kustomization(KUBERAY / "job"),
    }
    for size in SIZES:
        rendered[size] = render_kustomization(KUBERAY / "sizes" / size)
    common = {(o["kind"], o["metadata"]["name"]) for o in render_kustomization(KUBERAY / "common")}
    assert {
        ("ConfigMap", "fractalgen-env"),
        ("ServiceAccount", "fractalgen-ray"),
        ("NetworkPolicy", "fractalgen-ray-internal"),
    } <= common
    job_names = set()
    for key, objects in rendered.items():
        for obj in objects:
            assert obj["metadata"].get("namespace") in (None, "fractalgen") or obj["kind"] == "Namespace"
        rays = [o for o in objects if o["kind"] in ("RayCluster", "RayJob")]
        assert len(rays) == 1, key
        ray_obj = rays[0]
        assert ray_obj["apiVersion"] == "ray.io/v1"
        spec = _ray_cluster_spec(ray_obj)
        assert spec["rayVersion"] == ray_version
        head_group = spec["headGroupSpec"]
        assert head_group["serviceType"] == "ClusterIP"
        assert head_group["rayStartParams"]["num-gpus"] == "0"
        (group,) = spec["workerGroupSpecs"]
        groups = [head_group, group]
        for g in groups:
            pod = g["template"]["spec"]
            assert pod["serviceAccountName"] == "fractalgen-ray"
            assert g["template"]["metadata"]["labels"]["app.kubernetes.io/part-of"] == "fractalgen"
            for c in _containers(g):
                assert c["image"] == IMAGE
                assert c["workingDir"] == "/opt/fractalgen"
                assert {"configMapRef": {"name": "fractalgen-env"}} in c["envFrom"]
                secret_env = {
                    e["name"]: e["valueFrom"]["secretKeyRef"]["name"] for e in c["env"] if "valueFrom" in e
                }
                assert secret_env == {
                    "MLFLOW_TRACKING_USERNAME": "fractalgen-mlflow",
                    "MLFLOW_TRACKING_PASSWORD": "fractalgen-mlflow",
                }
        wpod = group["template"]["spec"]
        assert wpod["nodeSelector"]["node.kubernetes.io/instance-type"] == node.name
        (wc,) = _containers(group)
        for kind in ("requests", "limits"):
            assert (
                wc["resources"][kind]["nvidia.com/gpu"]
                == node.gpus
                == int(group["rayStartParams"]["num-gpus"])
            )
            assert wc["resources"][kind]["vpc.amazonaws.com/efa"] == len(nics)
        assert "IPC_LOCK" in wc["securityContext"]["capabilities"]["add"]
        shm_vol = {v["name"]: v for v in wpod["volumes"]}["dshm"]
        assert shm_vol["emptyDir"]["medium"] == "Memory"
        assert {"name": "dshm", "mountPath": "/dev/shm"} in wc["volumeMounts"]
        if ray_obj["kind"] == "RayJob":
            job_names.add(ray_obj["metadata"]["name"])
            assert ray_obj["spec"]["shutdownAfterJobFinishes"] is True
            entry = shlex.split(ray_obj["spec"]["entrypoint"])
            assert entry[:3] == ENTRYPOINT.split() and len(entry) == 4, ray_obj["spec"]["entrypoint"]
            recipe = REPO / entry[3]
            assert recipe.is_file() and entry[3].startswith("configs/"), entry[3]
            if key in SIZES:
                assert recipe.stem == key.replace("-", "_"), "the overlay runs its own model size"
            cfg = load(TrainRunConfig, recipe)
            assert cfg.cluster.gpus_per_worker == 1
            assert group["replicas"] == group["minReplicas"] == group["maxReplicas"]
            assert cfg.cluster.num_workers == group["replicas"] * node.gpus, (
                f"{key}: recipe wants {cfg.cluster.num_workers} workers, the RayJob gives "
                f"{group['replicas']} x {node.gpus} GPUs"
            )
        else:
            assert spec["enableInTreeAutoscaling"] is True and group["minReplicas"] == 0
    assert len(job_names) == 1 + len(SIZES), "each size has its own RayJob name"

    # --- the image: Dockerfile, its README, the docs; and no other tag of the image anywhere
    dockerfile = (INFRA / "docker" / "Dockerfile").read_text()
    assert f"-t {IMAGE} ." in dockerfile
    assert 'TORCH_CUDA_ARCH_LIST="9.0"' in dockerfile and "DS_BUILD_CPU_ADAM=1" in dockerfile
    assert "WORKDIR /opt/fractalgen" in dockerfile and "COPY configs/ configs/" in dockerfile
    for doc in (INFRA / "docker" / "README.md", REPO / "docs" / "operations.md"):
        assert IMAGE in doc.read_text(), doc
    pattern = re.compile(re.escape(IMAGE_REPOSITORY) + r":[\w.\-]+")
    files = [REPO / "ray_cluster.yaml", REPO / "docs" / "operations.md", REPO / "README.md"]
    files += [p for p in INFRA.rglob("*") if p.is_file()]
    for path in files:
        for tag in pattern.findall(path.read_text(errors="replace")):
            assert tag == IMAGE, f"{path} names {tag}, not {IMAGE}"

    # --- MLflow deployment
    compose = yaml.safe_load((INFRA / "mlflow" / "docker-compose.yaml").read_text())
    services = compose["services"]
    assert services["postgres"]["image"].startswith("postgres:") and "ports" not in services["postgres"]
    mlflow_env = services["mlflow"]["environment"]
    assert (
        mlflow_env["MLFLOW_ARTIFACTS_DESTINATION"].startswith("${") and "MLFLOW_ALLOWED_HOSTS" in mlflow_env
    )
    assert all(p.startswith("${MLFLOW_BIND:-127.0.0.1}:") for p in services["mlflow"]["ports"])
    entry = (INFRA / "mlflow" / "entrypoint.sh").read_text()
    for flag in ("--app-name basic-auth", "--allowed-hosts", "--artifacts-destination", "postgresql://"):
        assert flag in entry, flag
    mlflow_pin = re.search(r'"mlflow==([\d.]+)"', (REPO / "pyproject.toml").read_text())
    assert (
        mlflow_pin
        and f"MLFLOW_VERSION={mlflow_pin.group(1)}" in (INFRA / "mlflow" / "Dockerfile").read_text()
    )
    subprocess.run(["sh", "-n", str(INFRA / "mlflow" / "entrypoint.sh")], check=True)
    subprocess.run(["bash", "-n", str(STACK)], check=True)


def test_no_secrets_in_infrastructure_files() -> None:
    files = [REPO / "ray_cluster.yaml", *[p for p in INFRA.rglob("*") if p.is_file() and p.suffix != ".pyc"]]
    key_id = re.compile(r"\b(AKIA|ASIA)[A-Z0-9]{16}\b")
    assignment = re.compile(
        r"(?i)(?<!\{)\b[\w-]*(password|secret|secret_key|token)[ \t]*[:=][ \t]*['\"]?([^\s'\"#]+)"
    )
    allowed_values = re.compile(r"^(\$\{|\$\(|\"?\$|%s|<|\{|fractalgen-mlflow|testing|$)")
    for path in files:
        text = path.read_text(errors="replace")
        assert not key_id.search(text), f"{path}: an AWS access key id"
        assert "BEGIN RSA PRIVATE KEY" not in text and "BEGIN OPENSSH PRIVATE KEY" not in text
        if path.name in ("stack.py", "stack.sh"):
            continue  # moto's conventional dummy credentials only
        for m in assignment.finditer(text):
            value = m.group(2)
            assert (
                allowed_values.match(value) or value.endswith(("_PASSWORD", "_TOKEN")) or value.isupper()
            ), f"{path}: {m.group(0)!r} looks like a literal secret"


# ----------------------------------------------------------------------------------------------------
# the local stack
# ----------------------------------------------------------------------------------------------------


# deadlines sized for a loaded 2-core box (Ray and the MLflow server start in 20-40 s idle); the time
# the stack takes to come up is a benchmark figure, not a test assertion
STACK_UP_TIMEOUT_S = 360


def _stack(
    state_dir: Path, *args: str, timeout: float = STACK_UP_TIMEOUT_S + 60
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "FRACTALGEN_PYTHON": sys.executable}
    return subprocess.run(
        [str(STACK), "--state-dir", str(state_dir), *args],
        capture_output=True, text=True, timeout=timeout, env=env,
    )  # fmt: skip


def _stack_pids(state: dict) -> set[int]:
    """Every live process the stack owns: its leaders, their process groups, anything naming its Ray temp dir."""
    leaders = {s["pid"] for s in state["services"].values()}
    ray_tmp = state["ray_temp_dir"]
    pids = set()
    for proc in psutil.process_iter(["pid", "cmdline", "status"]):
        try:
            if proc.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            if (
                proc.info["pid"] in leaders
                or os.getpgid(proc.info["pid"]) in leaders
                or any(ray_tmp in part for part in proc.info["cmdline"] or ())
            ):
                pids.add(proc.info["pid"])
        except (psutil.Error, ProcessLookupError):
            continue
    return pids


@pytest.mark.slow
@pytest.mark.s3
def test_local_stack_starts_reports_healthy_and_stops_cleanly(tmp_path: Path) -> None:
    state_dir = tmp_path / "stack"
    state: dict | None = None
    try:
        up = _stack(state_dir, "up", "--timeout", str(STACK_UP_TIMEOUT_S), "--ray-cpus", "1")
        assert up.returncode == 0, up.stdout + up.stderr
        state = json.loads((state_dir / "state.json").read_text())
        for service in ("ray", "moto", "mlflow"):
            assert re.search(rf"^\s+{service}\s+healthy", up.stdout, re.M), up.stdout

        status = _stack(state_dir, "status", "--json")
        assert status.returncode == 0, status.stdout + status.stderr
        assert all(row["healthy"] for row in json.loads(status.stdout).values())

        env = dict(
            line.removeprefix("export ").split("=", 1)
            for line in _stack(state_dir, "env").stdout.splitlines()
            if line.startswith("export ")
        )
        # everything listens on 127.0.0.1
        for key in ("MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL", "RAY_API_SERVER_ADDRESS"):
            assert env[key].startswith("http://127.0.0.1:"), env[key]
        assert env["RAY_ADDRESS"].startswith("127.0.0.1:")
        # the wiring works: an experiment in MLflow's store, an artifact through MLflow into moto's S3
        mlflow = env["MLFLOW_TRACKING_URI"]
        req = urllib.request.Request(
            f"{mlflow}/api/2.0/mlflow/experiments/create",
            data=json.dumps({"name": "stack-test"}).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(req, timeout=30) as resp:
            assert json.loads(resp.read())["experiment_id"]
        payload = b"fractalgen stack test"
        req = urllib.request.Request(
            f"{mlflow}/api/2.0/mlflow-artifacts/artifacts/check/hello.txt", data=payload, method="PUT"
        )
        urllib.request.urlopen(req, timeout=30).close()
        import boto3

        s3 = boto3.client(
            "s3",
            endpoint_url=env["AWS_ENDPOINT_URL"],
            region_name=env["AWS_REGION"],
            aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        )
        obj = s3.get_object(Bucket=env["FRACTALGEN_BUCKET"], Key="mlflow-artifacts/check/hello.txt")
        assert obj["Body"].read() == payload
        # the Ray head accepts jobs: its job API answers, with the stack's token only
        assert env["RAY_AUTH_MODE"] == "token"
        token = Path(env["RAY_AUTH_TOKEN_PATH"]).read_text().strip()
        assert oct(Path(env["RAY_AUTH_TOKEN_PATH"]).stat().st_mode & 0o777) == "0o600"
        with pytest.raises(urllib.error.HTTPError) as denied:
            urllib.request.urlopen(f"{env['RAY_API_SERVER_ADDRESS']}/api/version", timeout=10)
        assert denied.value.code == 401
        req = urllib.request.Request(
            f"{env['RAY_API_SERVER_ADDRESS']}/api/version", headers={"Authorization": f"Bearer {token}"}
        )
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert "ray_version" in json.loads(resp.read())

        assert _stack_pids(state), "the stack's processes are visible before down"
        down = _stack(state_dir, "down")
        assert down.returncode == 0, down.stdout + down.stderr
        assert "no process left" in down.stdout
        assert not _stack_pids(state), "processes of the stack survived `down`"
        assert not Path(state["ray_temp_dir"]).exists()
        assert _stack(state_dir, "status").returncode == 1  # nothing running
    finally:
        if (state_dir / "state.json").exists():
            _stack(state_dir, "down")
        if state is not None:  # last resort: only the recorded ids of this test's stack
            for pid in _stack_pids(state):
                with __import__("contextlib").suppress(psutil.Error):
                    psutil.Process(pid).kill()
