"""Registry: register checkpoints as pyfunc versions on a real MLflow server, load by alias, predict,
review, promote, serve over HTTP."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch

from fractalgen.models import build_model, load_released, save_released

SETTINGS = {"num_iters": [2, 2], "cfg": 1.5, "temperature": 1.0, "cfg_schedule": "linear"}
LABELS = [0, 3, 7]


def direct_images(path: Path, seed: int) -> np.ndarray:
    """What model.sample gives for LABELS with SETTINGS and ``seed``, as uint8 (N, S, S, 3)."""
    model = load_released(path)
    images = model.sample(
        torch.tensor(LABELS), seed=seed, num_iters=(2, 2), cfg=1.5, temperature=1.0, cfg_schedule="linear"
    )
    return (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


@pytest.fixture(scope="module")
def registry(mlflow_server: str, tmp_path_factory: pytest.TempPathFactory):
    """Two versions of a fresh registered model: v1 registered, v2 imported as a released file."""

    from fractalgen.cli import main
    from fractalgen.platform import registry as reg
    from fractalgen.platform.artifacts.model_store import use_tracking_uri

    with use_tracking_uri(mlflow_server):
        root = tmp_path_factory.mktemp("registry")
        paths = []
        for seed in (1, 2):
            torch.manual_seed(seed)
            paths.append(save_released(build_model("fractalmar_tiny16"), root / f"ckpt{seed}.pth"))
        name = f"fractalgen-test-{uuid.uuid4().hex[:8]}"
        v1 = reg.register_checkpoint(
            str(paths[0]), name, metrics={"fid": 12.5, "inception_score": 1.5}, grid_images=4
        )
        code = main(
            ["registry", "import", str(paths[1]), "--name", name, "--grid-images", "4", "--num-iters", "2,2"]
        )
        assert code == 0
        reg.record_metrics(name, "2", {"fid": 9.25, "inception_score": 1.75})
        yield {"name": name, "paths": paths, "v1": v1, "uri": mlflow_server, "root": root}


def test_versions_are_registered_with_candidate_alias(registry) -> None:
    from fractalgen.platform import registry as reg

    c = reg.client()
    v1, v2 = (c.get_model_version(registry["name"], v) for v in ("1", "2"))
    assert v1.tags[reg.TAG_ARCH] == "fractalmar_tiny16" and v1.tags["metrics.fid"] == "12.5"
    assert v2.tags[reg.TAG_SOURCE_KIND] == "released"
    assert c.get_model_version_by_alias(registry["name"], reg.CANDIDATE).version == "2"  # the newest
    assert registry["v1"].model_uri == f"models:/{registry['name']}/1"


def test_pyfunc_by_alias_equals_direct_sampling(registry) -> None:
    import mlflow.pyfunc
    import pandas as pd

    from fractalgen.platform import registry as reg
    from fractalgen.platform.generation.serving import decode_images

    reg.promote(registry["name"], "1", out=io.StringIO())
    model = mlflow.pyfunc.load_model(f"models:/{registry['name']}@champion")
    pred = model.predict(pd.DataFrame({"label": LABELS}), params={**SETTINGS, "seed": 5})
    assert list(pred["label"]) == LABELS
    np.testing.assert_array_equal(decode_images(pred), direct_images(registry["paths"][0], seed=5))


def test_review_and_promote(registry, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from fractalgen.cli import main
    from fractalgen.platform import registry as reg

    name = registry["name"]
    reg.promote(name, "1", out=io.StringIO())  # its own starting point: 1 @champion, 2 @candidate
    html_path = tmp_path / "review.html"
    assert main(["registry", "review", name, "--html", str(html_path), "--no-thumbnails"]) == 0
    text = capsys.readouterr().out
    assert "version 1" in text and "version 2" in text
    assert "9.25 *" in text  # the better FID is marked
    page = html_path.read_text()
    assert page.count("data:image/png;base64,") == 2 and "version 2" in page

    assert main(["registry", "promote", name, "2", "--yes"]) == 0
    out = capsys.readouterr().out
    assert "version 1" in out and "version 2" in out  # the comparison is shown first
    assert reg.client().get_model_version_by_alias(name, reg.CHAMPION).version == "2"


def test_promote_unknown_version_is_a_clear_error(registry, capsys: pytest.CaptureFixture[str]) -> None:
    from fractalgen.cli import main
    from fractalgen.platform import registry as reg

    with pytest.raises(reg.RegistryError, match=r"has no version 99 \(versions: 1, 2\)"):
        reg.promote(registry["name"], "99")
    assert main(["registry", "promote", registry["name"], "99", "--yes"]) == 2
    assert "has no version 99" in capsys.readouterr().err
    assert main(["registry", "review", "no-such-model-xyz"]) == 2
    assert "no registered model named 'no-such-model-xyz'" in capsys.readouterr().err


def test_sample_cli_from_registered_model(registry, tmp_path: Path) -> None:
    from PIL import Image

    from fractalgen.cli import main

    out = tmp_path / "samples"
    uri = f"models:/{registry['name']}/1"
    assert main(["sample", "--model", uri, "--out", str(out), "--labels", "0,3,7", "--seed", "5",
                 "--num-iters", "2,2", "--cfg", "1.5", "--temperature", "1.0", "-q"]) == 0  # fmt: skip
    got = np.stack([np.asarray(Image.open(out / f"{i:05d}_class{lab}.png")) for i, lab in enumerate(LABELS)])
    np.testing.assert_array_equal(got, direct_images(registry["paths"][0], seed=5))
    record = json.loads((out / "sample.json").read_text())
    assert record["registered"] == {"name": registry["name"], "version": "1"}


@pytest.mark.slow
def test_mlflow_models_serve_answers_with_images(registry, tmp_path: Path) -> None:
    from platform_servers import free_port, stop_process, wait_http

    from fractalgen.platform import registry as reg
    from fractalgen.platform.generation.serving import decode_images

    reg.promote(registry["name"], "2", out=io.StringIO())  # this test's own champion
    port = free_port()
    log = tmp_path / "serve.log"
    # the scoring server is started as `uvicorn ...` from PATH: the venv's bin folder must be on it
    path = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    env = dict(os.environ, MLFLOW_TRACKING_URI=registry["uri"], FRACTALGEN_SERVE_DEVICE="cpu", PATH=path)
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{registry['name']}@champion",
           "--env-manager", "local", "--host", "127.0.0.1", "-p", str(port), "-w", "1"]  # fmt: skip
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{port}/ping", 120, proc, log)
        body = json.dumps(
            {"dataframe_records": [{"label": lab} for lab in LABELS], "params": {**SETTINGS, "seed": 5}}
        )
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations",
            data=body.encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=120) as resp:
            answer = json.loads(resp.read())
    finally:
        stop_process(proc)
    np.testing.assert_array_equal(decode_images(answer), direct_images(registry["paths"][1], seed=5))


def test_register_into_its_own_store_whatever_the_global_uri(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``register_checkpoint(tracking_uri=A)`` registers into A even while MLflow's process-wide URI
    names another (here an unreachable) server, and leaves that URI and its variable as they were.
    (MLflow's registry store looks the logged model up through the process-wide URI.)"""
    import mlflow

    from fractalgen.platform import registry as reg
    from fractalgen.platform.artifacts.model_store import use_tracking_uri

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    torch.manual_seed(3)
    weights = save_released(build_model("fractalmar_tiny16"), tmp_path / "tiny.pth")
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    elsewhere = "http://127.0.0.1:9"  # nothing listens on the discard port
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # a wrong call fails at once
    with use_tracking_uri(elsewhere):
        version = reg.register_checkpoint(str(weights), "own-store", tracking_uri=store, grid_images=0)
        assert mlflow.get_tracking_uri() == elsewhere
        assert os.environ["MLFLOW_TRACKING_URI"] == elsewhere
    assert "MLFLOW_TRACKING_URI" not in os.environ and "MLFLOW_REGISTRY_URI" not in os.environ
    assert version.version == "1"
    found = reg.client(store).get_model_version("own-store", "1")
    assert found.tags["fractalgen.model"] == "fractalmar_tiny16"


def test_review_shows_a_sweeps_whole_setting_and_nothing_for_an_unswept_version() -> None:
    from fractalgen.platform.registry import VersionSummary
    from fractalgen.sampling_settings import SamplingSettings

    unswept = VersionSummary(version="1", aliases=[], created="", run_id=None, tags={"metrics.fid": "3.0"})
    assert unswept.best_settings == "-"
    best = SamplingSettings(
        cfg=3.0, cfg_schedule="interval:start=0.1,end=0.6", lower_cfg=1.5, temperature_end=1.2
    )
    swept = VersionSummary(version="2", aliases=[], created="", run_id=None, tags=best.to_tags())
    assert "cfg_schedule=interval:start=0.1,end=0.6" in swept.best_settings
    assert "lower_cfg=1.5" in swept.best_settings and "temperature_end=1.2" in swept.best_settings
