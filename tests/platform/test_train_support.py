"""Helpers for the training tests (no tests here): a tiny dataset, tiny recipes, run inspection.
Servers (``mlflow server``, free ports, process groups) come from ``platform_servers`` / conftest.

Terms: a *tiny run* trains ``fractalmar_tiny16`` (16x16 images, 142k parameters) on the embedded
dataset cut to 10 classes x 8 images, global batch 8 = 2 workers x micro-batch 4, logging every
step so every step's loss is in the run state's history.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fractalgen import storage
from fractalgen.config import TrainRunConfig, load

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent

# Ray Train V2 knobs for short test runs (the driver passes them on to the controller): no
# preemption-watcher actor per run, and a faster worker poll.
RAY_TRAIN_TEST_ENV = {
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_DEDUP_LOGS": "0",
}


@contextlib.contextmanager
def local_ray(env_vars: dict[str, str] | None = None) -> Iterator[None]:
    """A local Ray (4 CPUs) for the duration, with the test knobs above; ``env_vars`` reach every
    Ray process of the runs (the runtime environment)."""
    import pytest
    import ray

    mp = pytest.MonkeyPatch()
    for key, value in RAY_TRAIN_TEST_ENV.items():
        mp.setenv(key, value)
    ray.init(num_cpus=4, include_dashboard=False, runtime_env={"env_vars": dict(env_vars or {})})
    try:
        yield
    finally:
        ray.shutdown()
        mp.undo()


def tiny_dataset(root: str | os.PathLike[str]) -> str:
    from fractalgen.pipelines.embedded import build_embedded_dataset

    out = os.path.join(root, "tiny16")
    build_embedded_dataset(out, size=16, images_per_class=8, num_classes=10)
    return out


def tiny_overrides(
    *,
    name: str,
    data: str,
    storage_path: str,
    stage: int,
    steps: int,
    every: int,
    endpoint: str | None = None,
) -> list[str]:
    out = [
        f"name={name}",
        "model.name=fractalmar_tiny16",
        f"data.train_uri={data}",
        "data.loader_workers=0",
        "data.record_samples=true",
        "train.global_batch_size=8",
        "train.micro_batch_per_gpu=4",
        "train.epochs=4",
        "train.warmup_epochs=0",
        "train.base_lr=0.5",  # lr 1.6e-2: the loss falls visibly within a dozen steps
        "train.precision=fp32",
        f"train.zero_stage={stage}",
        f"train.max_steps={steps}",
        "train.log_every_steps=1",
        "cluster.num_workers=2",
        "cluster.max_failures=1",
        f"checkpoint.storage_path={storage_path}",
        f"checkpoint.every_steps={every}",
        "checkpoint.keep_last=10",
        "mlflow.enabled=false",
        "eval.num_images=4",
    ]
    if endpoint:
        out.append(f"checkpoint.s3_endpoint_url={endpoint}")
    return out


def tiny_config(extra: list[str] = (), **kw: Any) -> TrainRunConfig:  # type: ignore[assignment]
    return load(TrainRunConfig, None, [*tiny_overrides(**kw), *extra])


def read_checkpoint_files(checkpoint: str, *, endpoint: str | None = None, world: int = 2) -> dict[str, Any]:
    """state.json and the per-rank sample ledgers of a checkpoint (local or s3://)."""
    state = storage.read_json(storage.join(checkpoint, "state.json"), endpoint=endpoint)
    ledgers = [
        storage.read_json(storage.join(checkpoint, "samples", f"rank_{r}.json"), endpoint=endpoint)
        for r in range(world)
    ]
    return {"state": state, "ledgers": ledgers}


def losses(state: dict[str, Any]) -> dict[int, float]:
    return {int(h["step"]): h["loss"] for h in state["history"]}
