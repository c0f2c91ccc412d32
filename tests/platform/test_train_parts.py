"""The named parts of the training loop that run without Ray (fractalgen/platform/training/):
the evaluator's bits/dim is ``evaluate_nll``'s on the same images, in a worker's rank layout."""

from __future__ import annotations

import math
import os

import pytest
from test_train_support import tiny_config, tiny_dataset


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> str:
    return tiny_dataset(tmp_path_factory.mktemp("data"))


def test_evaluator_bits_per_dim_is_evaluate_nll_on_the_first_micro_batches(
    dataset: str, tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In rank 0 of a 2-worker run (its loader has set RANK/WORLD_SIZE...), the evaluator's ``eval_bpd``
    equals ``evaluate_nll`` over ``eval.nll_batches`` micro-batches of the held-out set, is the same
    number at every evaluation of the same weights (seeded masks), and leaves the worker's rank layout
    and process-group check as it found them; the sample grid is a PNG. (That a process group's
    barriers do not hold rank 0 is shown by the 2-worker run in test_train.py.)"""
    import torch

    from fractalgen.platform.artifacts.run_plan import build_run_model
    from fractalgen.platform.evaluation.data import evaluate_nll
    from fractalgen.platform.training.driver import plan_run
    from fractalgen.platform.training.evaluator import Evaluator

    cfg = tiny_config(
        name="parts",
        data=dataset,
        storage_path=str(tmp_path / "runs"),
        stage=1,
        steps=2,
        every=2,
        extra=[
            f"data.eval_uri={dataset}",
            "eval.nll_batches=2",
            "eval.num_images=2",
            "eval.sample_iters=[2,2]",
        ],
    )
    plan = plan_run(cfg)
    layout = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2"}
    for key, value in layout.items():
        monkeypatch.setenv(key, value)
    torch.manual_seed(3)
    weights = build_run_model(plan).state_dict()

    is_initialized = torch.distributed.is_initialized
    evaluator = Evaluator(plan, torch.device("cpu"))
    png, metrics = evaluator(weights)
    again = evaluator(weights)[1]

    reference = build_run_model(plan)
    reference.load_state_dict(weights)
    reference.eval()
    with monkeypatch.context() as m:  # evaluate_nll as `fractalgen eval nll` runs it: one process
        for key in layout:
            m.delenv(key)
        expected = evaluate_nll(reference, dataset, batch_size=4, max_images=8, progress=False)
    assert expected["num_images"] == 8
    assert math.isfinite(metrics["eval_bpd"]) and metrics["eval_bpd"] > 0
    assert metrics["eval_bpd"] == pytest.approx(expected["nll_bpd"], rel=1e-6)
    assert again["eval_bpd"] == metrics["eval_bpd"]
    assert {k: os.environ[k] for k in layout} == layout
    assert torch.distributed.is_initialized is is_initialized
    assert png.startswith(b"\x89PNG")
