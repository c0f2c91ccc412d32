"""``fractalgen demo`` end to end (what ``make demo`` runs), shortened for CI.

- ``test_demo_runs_end_to_end``: the recipe (``fractalmar_demo32``) cut to 4 steps: the embedded
  dataset, Ray Train + DeepSpeed ZeRO-2 on 2 CPU workers, export, the evidence of learning (the
  before/after grids and the curve, written and logged to the training run in MLflow), the registry
  steps (two versions, a sweep, ``champion`` to the best, the review) and the closing summary;
- ``test_demo_learns``: the same demo with the small ``fractalmar_tiny16`` (16x16) for 160 steps,
  without the registry steps: the learning check passes (own-class share >= 3x chance, bits/dim
  fell), computed by the demo itself. The full demo's figures are quoted in the README."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from test_train_support import RAY_TRAIN_TEST_ENV

from fractalgen.cli import main
from fractalgen.models import load_released
from fractalgen.pipelines.embedded import DEMO_CLASSES

EVIDENCE = ("learning_curve.png", "samples_before_after.png", "samples.png")


def _run_demo(out: Path, monkeypatch: pytest.MonkeyPatch, capsys, *options: str) -> tuple[str, Any, Any]:
    """Run ``fractalgen demo --out out *options``; returns the printed text, the MLflow client of
    the demo's store and the training run."""
    from mlflow.tracking import MlflowClient

    for key, value in RAY_TRAIN_TEST_ENV.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the demo sets it; restored afterwards
    try:
        assert main(["demo", "--out", str(out), *options]) == 0
    finally:
        import ray

        ray.shutdown()  # the demo starts a local Ray, as `make demo` does; later modules start their own
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("fractalgen-demo").experiment_id
    (run,) = client.search_runs([experiment], "tags.`fractalgen.run_name` = 'demo'")
    return capsys.readouterr().out, client, run


def _assert_evidence_logged(out: Path, client: Any, run: Any, size: int) -> None:
    """The curve and the grids are in ``out`` and in the training run's artifacts; grids scaled up."""
    logged = {a.path for a in client.list_artifacts(run.info.run_id, "learning")}
    for name in EVIDENCE:
        assert f"learning/{name}" in logged, name
        assert Image.open(out / name).format == "PNG", name
    after, both = Image.open(out / "samples.png"), Image.open(out / "samples_before_after.png")
    scale = 128 // size  # fractalgen.platform.images.auto_scale
    assert after.width >= 6 * size * scale and after.height >= len(DEMO_CLASSES) * size * scale
    assert both.width > 3 * after.width  # before, after, training images
    assert {"learning.own_class_share", "learning.nll_bpd", "learning.learned"} <= set(run.data.metrics)


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    out = tmp_path / "demo"
    printed, client, run = _run_demo(
        out, monkeypatch, capsys, "--set", "train.max_steps=4", "--set", "checkpoint.every_steps=2"
    )

    weights = load_released(out / "fractalmar_demo32.pth")  # strict load of the exported weights
    assert weights.config.class_names == tuple(sorted(DEMO_CLASSES))
    _assert_evidence_logged(out, client, run, size=32)
    assert (out / "registry_review.html").read_text().count("version") >= 2

    versions = client.search_model_versions("name = 'fractalgen-demo'")
    assert len(versions) == 2  # the step-2 checkpoint and the final weights
    champion = client.get_model_version_by_alias("fractalgen-demo", "champion")
    assert any(k.startswith("sampling.") for k in champion.tags)  # the sweep's best setting
    for line in (
        "finished at step 4/",
        "samples nearest their own class by colour",
        "curve:",
        "samples:",
        "review:",
        f"mlflow ui --backend-store-uri sqlite:///{out}",
    ):
        assert line in printed, line


@pytest.mark.slow
def test_demo_learns(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    out = tmp_path / "demo"
    recipe = ["model.name=fractalmar_tiny16", "train.epochs=10", "train.base_lr=4.8e-2"]  # 160 steps
    printed, client, run = _run_demo(
        out, monkeypatch, capsys, "--no-registry", *(f"--set={r}" for r in recipe)
    )

    m = run.data.metrics
    chance = 1 / len(DEMO_CLASSES)
    assert m["learning.chance"] == pytest.approx(chance)
    assert m["learning.own_class_share"] >= 3 * chance  # the samples carry their own class's colours
    assert m["learning.own_class_share_before"] < 3 * chance  # the untrained model's do not
    assert m["learning.nll_bpd"] < m["learning.nll_bpd_before"]  # bits/dim fell
    assert m["learning.learned"] == 1.0
    _assert_evidence_logged(out, client, run, size=16)
    assert "finished at step 160/" in printed and ": learned" in printed
