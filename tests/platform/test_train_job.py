"""The cluster path end to end: a local Ray head (``ray start --head``, started by the test, with its
dashboard's job server), ``ray job submit --working-dir ... -- fractalgen train --config ...``, and a
real ``mlflow server``: the job succeeds and its params, metrics, sample grid and checkpoint links
are in the server."""

from __future__ import annotations

import os
import re
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from platform_servers import free_port, stop_process, wait_http
from test_train_support import BIN, RAY_TRAIN_TEST_ENV, tiny_config, tiny_dataset

from fractalgen.config import save

pytestmark = pytest.mark.slow
STEPS = 4


@pytest.fixture(scope="module")
def ray_head() -> Iterator[dict[str, str]]:
    """``ray start --head --block`` in its own process group, every port chosen free on 127.0.0.1."""
    temp = tempfile.mkdtemp(prefix="rayj", dir="/tmp")  # short: Ray's unix socket paths are limited
    gcs, dashboard, client, agent = free_port(), free_port(), free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env.update(RAY_TRAIN_TEST_ENV)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"  # the job's shell finds `fractalgen`
    # token authentication, as on a real cluster, with a token of this test's own
    token = Path(temp) / "auth_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token))
    log = Path(temp) / "head.log"
    cmd = [
        str(BIN / "ray"), "start", "--head", "--block",
        "--node-ip-address=127.0.0.1", f"--port={gcs}", "--num-cpus=3",
        "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
        f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}",
        f"--temp-dir={temp}", "--disable-usage-stats",
    ]  # fmt: skip
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{dashboard}"
    try:
        wait_http(f"{url}/api/version", 120, proc, log)
        yield {"dashboard": url, "env": env}  # type: ignore[misc]
    finally:
        stop_process(proc, timeout_s=5)  # `ray start --block` ignores SIGTERM for long; SIGKILL the group
        shutil.rmtree(temp, ignore_errors=True)


def test_ray_job_submit_trains_and_logs_to_mlflow(ray_head, mlflow_server: str, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    data = tiny_dataset(tmp_path)
    storage_path = str(tmp_path / "runs")
    cfg = tiny_config(
        name="job",
        data=data,
        storage_path=storage_path,
        stage=2,
        steps=STEPS,
        every=2,
        extra=[
            "mlflow.enabled=true",
            f"mlflow.tracking_uri={mlflow_server}",
            "mlflow.experiment=train-job-test",
        ],
    )
    workdir = tmp_path / "job"
    workdir.mkdir()
    save(cfg, workdir / "job.yaml")
    cmd = [
        str(BIN / "ray"), "job", "submit", "--address", ray_head["dashboard"], "--working-dir", str(workdir),
        "--", "fractalgen", "train", "--config", "job.yaml", "--set", "train.log_every_steps=1",
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=480, env=ray_head["env"])
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]
    assert f"finished at step {STEPS}" in output and "[fractalgen] step 1/4" in output, output[-4000:]

    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("train-job-test")
    runs = client.search_runs([experiment.experiment_id], filter_string="tags.`fractalgen.run_name` = 'job'")
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["train.zero_stage"] == "2" and run.data.params["cluster.num_workers"] == "2"
    for name in ("loss", "bpd", "lr", "grad_norm", "images_per_s", "epoch"):
        history = client.get_metric_history(run.info.run_id, name)
        assert [m.step for m in history] == list(range(1, STEPS + 1)), name
    assert run.data.tags["checkpoint.latest"] == f"{storage_path}/job/checkpoint_{STEPS:09d}"
    samples = [a.path for a in client.list_artifacts(run.info.run_id, "samples")]
    assert samples == [f"samples/samples_step_{STEPS:09d}.png"]
    assert any(a.path.startswith("config/") for a in client.list_artifacts(run.info.run_id, "config"))
    assert re.search(
        r"\[fractalgen\] step 2/4 \| epoch [\d.]+ \| loss [\d.]+ \| .* img/s \| eta \d+:\d\d:\d\d", output
    )
    assert client.get_metric_history(run.info.run_id, "host_rss_gib")  # memory (GPU memory on GPUs)

    # the run's ZeRO-2 checkpoint becomes a registered version linked to this training run
    from fractalgen.platform.registry import TAG_TRAINING_RUN, register_checkpoint

    version = register_checkpoint(
        f"{storage_path}/job", "train-job-model", tracking_uri=mlflow_server, grid_images=2
    )
    mv = client.get_model_version("train-job-model", version.version)
    assert mv.tags[TAG_TRAINING_RUN] == run.info.run_id
    assert client.get_run(mv.run_id).data.tags["mlflow.parentRunId"] == run.info.run_id
