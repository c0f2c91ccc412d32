"""Sweeps: Ray Tune over sampling settings with a tiny model on CPU, nested MLflow runs on a real
server, the best setting written back to the registered version, Parquet + plot exports."""

from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np
import pytest
import torch

from fractalgen.config import ConfigError
from fractalgen.models import build_model, save_released
from fractalgen.platform.tuning.sweep import (
    SweepEvalConfig,
    load_sweep_config,
    param_space,
    plot_fid_vs_cfg,
    write_table,
)

ROOT = Path(__file__).resolve().parents[2]


def test_rungs_follow_the_reduction_factor() -> None:
    assert SweepEvalConfig(num_images=50_000, min_images=5_000, reduction_factor=3).rungs() == [
        5000,
        15000,
        45000,
        50000,
    ]
    assert SweepEvalConfig(num_images=8, min_images=2, reduction_factor=2).rungs() == [2, 4, 8]
    assert SweepEvalConfig(num_images=8, min_images=2, early_stopping=False).rungs() == [8]
    with pytest.raises(ValueError, match="min_images"):
        SweepEvalConfig(num_images=4, min_images=8)


def test_recipes_load_and_bad_keys_fail() -> None:
    for name in ("sweep_demo.yaml", "sweep_fractalmar_in64.yaml"):
        cfg = load_sweep_config(str(ROOT / "configs" / name))
        assert cfg.space.grid_size() >= 4
    with pytest.raises(ConfigError, match=r"space\.guidance"):
        load_sweep_config(str(ROOT / "configs" / "sweep_demo.yaml"), ["space.guidance=2"])
    with pytest.raises(ConfigError, match="model: required"):
        load_sweep_config(None, ["eval.reference=x.npz"])


def test_optuna_space_has_no_grid_search() -> None:
    from ray.tune.search.optuna import OptunaSearch

    cfg = load_sweep_config(
        str(ROOT / "configs" / "sweep_fractalmar_in64.yaml"),
        ["space.cfg_range=[2.0, 9.0]", "search.algorithm=optuna"],
    )
    space = param_space(cfg)
    assert not any(isinstance(v, dict) and "grid_search" in v for v in space.values())
    assert OptunaSearch(seed=0).set_search_properties("fid", "min", space)


def test_table_and_plot(tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    rows = [
        {"trial_id": f"t{i}", "cfg": c, "temperature": t, "cfg_schedule": "linear", "num_iters": "2,2",
         "num_images": 8 if i % 3 else 4, "fid": 10.0 - c + t, "inception_score": 1.0, "precision": float("nan"),
         "recall": float("nan"), "status": "completed" if i % 3 else "early-stopped", "mlflow_run_id": "", "error": ""}
        for i, (c, t) in enumerate([(1.0, 1.0), (2.0, 1.0), (3.0, 1.0), (1.0, 1.5), (2.0, 1.5), (3.0, 1.5)])
    ]  # fmt: skip
    table = pq.read_table(write_table(rows, tmp_path / "r.parquet"))
    assert table.num_rows == 6 and table.column("status").to_pylist()[0] == "early-stopped"
    assert plot_fid_vs_cfg(rows, tmp_path / "p.png").stat().st_size > 1000


@pytest.fixture(scope="module")
def local_ray():
    import ray

    if ray.is_initialized():  # another module's Ray is still up: share it
        yield
        return
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        yield
    finally:
        ray.shutdown()


@pytest.mark.slow
def test_sweep_four_trials_nested_runs_and_best_setting_tags(
    mlflow_env: str, inception_weights: Path, local_ray, tmp_path: Path
) -> None:
    import pyarrow.parquet as pq
    from mlflow.tracking import MlflowClient

    from fractalgen.platform import registry as reg
    from fractalgen.platform.evaluation.inception import extract_features, load_inception
    from fractalgen.platform.evaluation.metrics import feature_statistics, save_statistics
    from fractalgen.platform.tuning.sweep import run_sweep

    torch.manual_seed(0)
    ckpt = save_released(build_model("fractalmar_tiny16"), tmp_path / "tiny.pth")
    name = f"sweep-test-{uuid.uuid4().hex[:8]}"
    version = reg.register_checkpoint(str(ckpt), name, grid_images=0)
    # reference statistics: 4 random "real" images
    rng = np.random.default_rng(0)
    real = torch.from_numpy(rng.integers(0, 256, size=(4, 3, 16, 16)).astype(np.float32) / 255)
    feats, _ = extract_features(load_inception(inception_weights), real)
    reference = save_statistics(feature_statistics(feats), tmp_path / "ref.npz")

    cfg = load_sweep_config(
        None,
        [
            "name=tiny",
            f"model={version.model_uri}",
            f"storage_path={tmp_path / 'ray'}",
            "space.cfg=[1.0, 2.0]",
            "space.temperature=[1.0, 1.5]",
            "space.num_iters=[[2, 2]]",
            f"eval.reference={reference}",
            f"eval.inception={inception_weights}",
            "eval.num_images=4",
            "eval.min_images=2",
            "eval.batch_size=2",
            "mlflow.experiment=sweep-tests",
        ],
    )
    result = run_sweep(cfg, progress=False)

    assert len(result.rows) == 4 and result.best is not None, result.rows
    assert {r["status"] for r in result.rows} <= {"completed", "early-stopped"}
    table = pq.read_table(result.table)
    assert table.num_rows == 4 and set(table.column("cfg").to_pylist()) == {1.0, 2.0}
    assert result.plot is not None and result.plot.is_file()

    client = MlflowClient(mlflow_env)
    children = client.search_runs(
        [client.get_experiment_by_name("sweep-tests").experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{result.parent_run_id}'",
    )
    assert len(children) == 4
    assert all("fid" in run.data.metrics for run in children)
    assert {run.info.status for run in children} <= {"FINISHED", "KILLED"}

    tags = client.get_model_version(name, version.version).tags
    best = result.best
    assert (
        float(tags["sampling.cfg"]) == best["cfg"]
        and float(tags["sampling.temperature"]) == best["temperature"]
    )
    assert tags["sampling.num_iters"] == "2,2" and tags["sweep.run_id"] == result.parent_run_id
    assert float(tags["sweep.fid"]) == pytest.approx(
        min(r["fid"] for r in result.rows if r["status"] == "completed"), rel=1e-5
    )
