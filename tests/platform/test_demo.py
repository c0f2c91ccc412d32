"""``fractalgen demo`` end to end (what ``make demo`` runs), shortened to 4 training steps: the
embedded dataset, Ray Train + DeepSpeed ZeRO-2 on 2 CPU workers, export, the sample grid, then the
registry steps (two versions, a sweep, ``champion`` to the best, the review) and the closing summary."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image
from test_train_support import RAY_TRAIN_TEST_ENV

from fractalgen.cli import main
from fractalgen.models import load_released


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    from mlflow.tracking import MlflowClient

    for key, value in RAY_TRAIN_TEST_ENV.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the demo sets it; restored afterwards
    out = tmp_path / "demo"
    args = ["demo", "--out", str(out), "--set", "train.max_steps=4", "--set", "checkpoint.every_steps=2"]
    try:
        assert main(args) == 0
    finally:
        import ray

        ray.shutdown()  # the demo starts a local Ray, as `make demo` does; later modules start their own
    printed = capsys.readouterr().out

    weights = load_released(out / "fractalmar_demo32.pth")  # strict load of the exported weights
    assert weights.config.num_classes == 16 and len(weights.config.class_names) == 16
    assert Image.open(out / "samples.png").size[0] >= 4 * 32  # one image per class, 4 x 4
    assert (out / "registry_review.html").read_text().count("version") >= 2

    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    versions = client.search_model_versions("name = 'fractalgen-demo'")
    assert len(versions) == 2  # the step-2 checkpoint and the final weights
    champion = client.get_model_version_by_alias("fractalgen-demo", "champion")
    assert any(k.startswith("sampling.") for k in champion.tags)  # the sweep's best setting
    for line in (
        "finished at step 4/",
        "samples:",
        "review:",
        f"mlflow ui --backend-store-uri sqlite:///{out}",
    ):
        assert line in printed, line
