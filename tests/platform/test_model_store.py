"""The MLflow helpers every MLflow user here shares (``fractalgen.platform.artifacts.model_store``):
flat params from a nested config, and finding or creating an experiment (training runs, sweeps and
registrations all go through them)."""

from __future__ import annotations

from pathlib import Path

from fractalgen.config import TrainRunConfig, to_dict
from fractalgen.platform.artifacts.model_store import (
    MAX_PARAM_LENGTH,
    client,
    ensure_experiment,
    flatten_params,
)


def test_flatten_params() -> None:
    nested = {"train": {"betas": [0.9, 0.95], "lr": 1e-4, "opt": {"name": "adamw"}}, "tags": ["a", "b"]}
    assert flatten_params("", nested, {}) == {
        "train.betas": "[0.9, 0.95]",
        "train.lr": "0.0001",
        "train.opt.name": "adamw",
        "tags": '["a", "b"]',
    }
    out = {"kept": "x"}
    assert flatten_params("p.", {"long": "v" * (MAX_PARAM_LENGTH + 10)}, out) is out
    assert out == {"kept": "x", "p.long": "v" * MAX_PARAM_LENGTH}
    flat = flatten_params("", to_dict(TrainRunConfig()), {})
    assert flat["train.zero_stage"] == str(TrainRunConfig().train.zero_stage)
    assert all(isinstance(v, str) for v in flat.values()) and flat["name"] == TrainRunConfig().name


def test_ensure_experiment_once_with_artifacts_beside_sqlite(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'db' / 'mlflow.db'}"
    (tmp_path / "db").mkdir()
    c = client(uri)
    first = ensure_experiment(c, "exp-a", uri)
    assert ensure_experiment(c, "exp-a", uri) == first  # found again, not created twice
    assert ensure_experiment(c, "exp-b") != first  # the client's own URI when none is given
    location = c.get_experiment(first).artifact_location
    assert location == f"file://{tmp_path / 'db' / 'mlartifacts'}"
