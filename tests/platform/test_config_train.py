"""Training recipes and launch checks without Ray: configs/*.yaml, dotted overrides, errors that must
come before any Ray resources (bad key, bad value, missing dataset, unreachable MLflow), the lr
schedule, AdamW groups, the DeepSpeed config, and the resilient MLflow tracker."""

from __future__ import annotations

import itertools
import logging
import math
import threading
from pathlib import Path

import pytest
from platform_servers import free_port
from test_train_support import REPO, tiny_dataset, tiny_overrides

from fractalgen.cli import main
from fractalgen.config import ConfigError, TrainRunConfig, load

CONFIGS = REPO / "configs"
RELEASED = {
    # name: (global batch, epochs)  -- docs/model.md#training-recipe
    "fractalar_in64": (2048, 800),
    "fractalmar_in64": (2048, 800),
    "fractalmar_base_in256": (1024, 800),
    "fractalmar_large_in256": (1024, 800),
    "fractalmar_huge_in256": (1024, 600),
}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> str:
    return tiny_dataset(tmp_path_factory.mktemp("data"))


def _ray_started() -> bool:
    import ray

    return ray.is_initialized()


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_released_recipes_follow_spec(name: str) -> None:
    cfg = load(TrainRunConfig, CONFIGS / f"{name}.yaml")
    batch, epochs = RELEASED[name]
    t = cfg.train
    assert cfg.model.name == name and cfg.model.num_classes == 1000
    assert (t.global_batch_size, t.epochs, t.warmup_epochs) == (batch, epochs, 40)
    assert (t.base_lr, t.weight_decay, t.grad_clip, t.betas) == (5e-5, 0.05, 3.0, (0.9, 0.95))
    assert cfg.lr == pytest.approx(5e-5 * batch / 256)
    assert (
        cfg.model.dropout == 0.1 and cfg.model.label_drop_prob == 0.1 and cfg.model.activation_checkpointing
    )
    assert cfg.cluster.num_workers * cfg.cluster.gpus_per_worker == 32  # 32 H100s
    assert t.precision == "bf16" and cfg.cluster.max_failures > 0


def test_demo_recipe_runs_on_two_cpu_workers_with_zero2() -> None:
    cfg = load(TrainRunConfig, CONFIGS / "demo.yaml")
    assert cfg.cluster.num_workers == 2 and cfg.cluster.gpus_per_worker == 0
    assert cfg.train.zero_stage == 2 and cfg.train.precision == "fp32"
    assert cfg.model.name == "fractalmar_demo32"


def test_dotted_overrides_are_typed() -> None:
    cfg = load(
        TrainRunConfig,
        CONFIGS / "fractalmar_large_in256.yaml",
        ["train.zero_stage=3", "train.betas=[0.9, 0.99]", "train.offload_optimizer=true", "name=x"],
    )
    assert cfg.train.zero_stage == 3 and cfg.train.betas == (0.9, 0.99) and cfg.train.offload_optimizer
    assert cfg.name == "x" and cfg.grad_accum_steps == 1


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("train.zero_stag=3", "train.zero_stag"),
        ("train.zero_stage=5", "train.zero_stage"),
        ("train.precision=fp16", "train.precision"),
        ("train.global_batch_size=100", "train.global_batch_size"),
        ("train.offload_params=true", "train.offload_params"),
        ("cluster.gpus_per_worker=2", "cluster.gpus_per_worker"),
        ("checkpoint.keep_last=0", "checkpoint.keep_last"),
        ("mlflow.tracking_uri=[1]", "mlflow.tracking_uri"),
        ("model.attention=flash", "model.attention"),
        ("eval.cfg_schedule=wobbly", "eval.cfg_schedule"),
        ("eval.cfg_schedule=interval:start=0.9,end=0.1", "eval.cfg_schedule"),
        ("eval.lower_cfg=0.5", "eval.lower_cfg"),
        ("eval.temperature_end=0", "eval.temperature_end"),
    ],
)
def test_bad_key_or_value_fails_before_ray_naming_the_key(override: str, key: str, capsys) -> None:
    code = main(["train", "--config", str(CONFIGS / "demo.yaml"), "--set", override])
    err = capsys.readouterr().err
    assert code == 2 and key in err, err
    assert not _ray_started()


def test_recipe_eval_section_holds_a_whole_sampling_setting() -> None:
    cfg = load(TrainRunConfig, str(CONFIGS / "demo.yaml"), [
        "eval.cfg_schedule=power-cosine:exponent=3", "eval.lower_cfg=1.5",
        "eval.lower_cfg_schedule=interval:start=0,end=0.5", "eval.temperature_end=0.9",
    ])  # fmt: skip
    s = cfg.eval.sampling()
    assert (
        str(s.cfg_schedule) == "power-cosine:exponent=3"
        and str(s.lower_cfg_schedule) == "interval:start=0,end=0.5"
    )
    assert (s.lower_cfg, s.temperature_end) == (1.5, 0.9)
    assert (
        cfg.eval.sampling(unconditional=True).cfg is None
        and cfg.eval.sampling(unconditional=True).lower_cfg is None
    )


def test_missing_dataset_uri_fails_before_ray(tmp_path: Path, capsys) -> None:
    missing = tmp_path / "no-such-dataset"
    code = main(["train", "--config", str(CONFIGS / "demo.yaml"), "--set", f"data.train_uri={missing}"])
    err = capsys.readouterr().err
    assert code == 2 and "data.train_uri" in err and str(missing) in err, err
    assert not _ray_started()


def test_dataset_that_does_not_fit_the_model_is_refused(dataset: str, capsys) -> None:
    code = main(["train", "--config", str(CONFIGS / "demo.yaml"), "--set", f"data.train_uri={dataset}"])
    err = capsys.readouterr().err
    assert code == 2 and "16x16" in err and "32x32" in err, err


def test_dry_run_prints_resolved_config_and_plan(dataset: str, tmp_path: Path, capsys) -> None:
    overrides = tiny_overrides(
        name="dry", data=dataset, storage_path=str(tmp_path), stage=2, steps=6, every=3
    )
    args = ["train", "--config", str(CONFIGS / "demo.yaml"), "--dry-run"]
    for o in overrides:
        args += ["--set", o]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "zero_stage: 2" in out and "80 images, 10 steps/epoch, 40 steps (stop at 6)" in out, out
    assert not _ray_started()


def test_unreachable_mlflow_at_launch_stops_before_ray(dataset: str, tmp_path: Path, capsys, caplog) -> None:
    """Documented behaviour: an MLflow server that does not answer within mlflow.connect_timeout_s
    stops the launch (exit 2, naming mlflow.tracking_uri); with mlflow.required=false the run goes
    on untracked, with a warning."""
    from fractalgen.platform.training.driver import open_tracking, plan_run

    dead = f"http://127.0.0.1:{free_port()}"
    overrides = tiny_overrides(
        name="nomlflow", data=dataset, storage_path=str(tmp_path), stage=2, steps=2, every=2
    )
    overrides += ["mlflow.enabled=true", f"mlflow.tracking_uri={dead}", "mlflow.connect_timeout_s=1"]
    args = ["train", "--config", str(CONFIGS / "demo.yaml")]
    for o in overrides:
        args += ["--set", o]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "mlflow.tracking_uri" in err and dead in err and "mlflow.required=false" in err, err
    assert not _ray_started()

    cfg = load(TrainRunConfig, None, [*overrides, "mlflow.required=false"])
    with caplog.at_level(logging.WARNING):
        plan = open_tracking(plan_run(cfg))
    assert plan.mlflow_run_id is None and "training without MLflow tracking" in caplog.text


def test_learning_rate_warms_up_then_follows_cosine() -> None:
    from fractalgen.platform.training.engine import learning_rate

    cfg = load(
        TrainRunConfig,
        None,
        [
            "train.global_batch_size=512",
            "train.micro_batch_per_gpu=256",
            "train.epochs=10",
            "train.warmup_epochs=2",
        ],
    )
    peak = 5e-5 * 512 / 256
    lr = [learning_rate(s, cfg=cfg, steps_per_epoch=100) for s in range(0, 1001)]
    assert lr[0] == 0.0 and lr[100] == pytest.approx(peak / 2) and lr[200] == pytest.approx(peak)
    assert all(a < b for a, b in itertools.pairwise(lr[:201]))  # linear warm-up, every step
    assert lr[600] == pytest.approx(peak * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr[1000] == pytest.approx(0.0, abs=1e-12) and all(a >= b for a, b in itertools.pairwise(lr[200:]))


def test_weight_decay_skips_biases_and_1d_parameters() -> None:
    from fractalgen.models import build_model
    from fractalgen.platform.training.engine import param_groups

    model = build_model("fractalmar_tiny16")
    decay, no_decay = param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim >= 2 and not names[id(p)].endswith(".bias") for p in decay["params"])
    assert all(p.ndim <= 1 or names[id(p)].endswith(".bias") for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_deepspeed_config_follows_the_recipe(stage: int) -> None:
    from fractalgen.platform.training.engine import deepspeed_config

    extra = ["train.offload_optimizer=true"] if stage else []
    if stage == 3:
        extra.append("train.offload_params=true")
    cfg = load(TrainRunConfig, CONFIGS / "fractalmar_large_in256.yaml", [f"train.zero_stage={stage}", *extra])
    ds = deepspeed_config(cfg, use_gpu=True)
    assert ds["zero_optimization"]["stage"] == stage
    assert ds["train_batch_size"] == 1024 and ds["train_micro_batch_size_per_gpu"] == 32
    assert ds["gradient_accumulation_steps"] == 1 and ds["gradient_clipping"] == 3.0
    assert ds["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"} and "bf16" not in ds
    assert ("offload_optimizer" in ds["zero_optimization"]) == (stage > 0)
    assert ("offload_param" in ds["zero_optimization"]) == (stage == 3)


def test_step_seed_is_a_pure_function_of_its_coordinates() -> None:
    from fractalgen.platform.training.train_step import step_seed

    seeds = {step_seed(0, r, s, m) for r in range(2) for s in range(50) for m in range(2)}
    assert len(seeds) == 200 and step_seed(0, 1, 7, 0) == step_seed(0, 1, 7, 0)


class _FlakyClient:
    """Stands in for MlflowClient: the first ``failures`` calls raise, later ones record."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.batches: list[tuple[str, list]] = []
        self.artifacts: list[str] = []
        self.release = threading.Event()  # the delivery thread waits on it: a server that hangs
        self.release.set()

    def log_batch(self, run_id: str, metrics=(), tags=()) -> None:
        assert self.release.wait(timeout=120), "the test never released the hanging client"
        if self.failures > 0:
            self.failures -= 1
            raise ConnectionError("tracking server unreachable")
        self.batches.append((run_id, list(metrics) + list(tags)))

    def log_artifact(self, run_id: str, path: str, artifact_path: str | None = None) -> None:
        self.artifacts.append(Path(path).read_text())


def test_tracker_keeps_records_while_server_is_away_and_delivers_them_later(tmp_path: Path, caplog) -> None:
    from fractalgen.platform.training.tracking import RunTracker

    client = _FlakyClient(failures=3)
    client.release.clear()  # the server hangs: every delivery blocks until released below
    tracker = RunTracker("http://unused", "run1", client=client, retry_s=0.05)
    note = tmp_path / "note.txt"
    note.write_text("grid")
    with caplog.at_level(logging.WARNING):
        # the training loop never waits for the server: these calls return while it hangs
        for step in range(1, 6):
            tracker.log_metrics({"loss": 6.0 - step}, step)
        tracker.log_artifact(str(note), "samples")
        note.unlink()  # the tracker logs its own copy
        assert client.batches == []
        client.release.set()
        assert tracker.flush(timeout_s=120)
    tracker.close()
    steps = [m.step for _, batch in client.batches for m in batch]
    assert steps == [1, 2, 3, 4, 5] and client.artifacts == ["grid"]
    assert "training goes on" in caplog.text and "reachable again" in caplog.text


def test_tracker_on_unreachable_server_does_not_block_training(caplog) -> None:
    from fractalgen.platform.training.tracking import RunTracker

    tracker = RunTracker(f"http://127.0.0.1:{free_port()}", "0" * 32, retry_s=0.2)
    with caplog.at_level(logging.WARNING):
        for step in range(100):  # queued; each call returns without reaching the server
            tracker.log_metrics({"loss": 1.0}, step)
        tracker.close(timeout_s=2.0)  # gives up on the undelivered records (bounded), see the log
    assert "could not log" in caplog.text and "could not be delivered" in caplog.text


def test_bad_recipe_file_is_a_config_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  zero_stage: 2\n  micro_batch: 4\n")
    with pytest.raises(ConfigError, match=r"train\.micro_batch"):
        load(TrainRunConfig, bad)


@pytest.mark.parametrize("keep_best", [True, False])
def test_pruning_keeps_the_latest_n_and_the_best(tmp_path: Path, keep_best: bool) -> None:
    """Checkpoints at steps 1..6 with the best loss at step 2: keep_last=2 keeps 5 and 6 (and 2)."""
    from fractalgen.platform.artifacts.run_plan import WorkerPlan
    from fractalgen.platform.training.checkpointer import RunState, checkpoint_dir_name, prune_checkpoints

    cfg = load(
        TrainRunConfig,
        None,
        [
            f"checkpoint.storage_path={tmp_path}",
            "checkpoint.keep_last=2",
            f"checkpoint.keep_best={keep_best}",
        ],
    )
    run = tmp_path / "run"
    for step in range(1, 7):
        (run / checkpoint_dir_name(step)).mkdir(parents=True)
        (run / checkpoint_dir_name(step) / "state.json").write_text("{}")
    plan = WorkerPlan(
        config=cfg,
        run_uri=str(run),
        num_images=8,
        num_classes=1,
        steps_per_epoch=1,
        total_steps=6,
        stop_step=6,
    )
    deleted = prune_checkpoints(plan, RunState(step=6, best_loss=0.5, best_step=2))
    kept = sorted(p.name for p in run.iterdir())
    expected = {5, 6} | ({2} if keep_best else set())
    assert kept == sorted(checkpoint_dir_name(s) for s in expected)
    assert sorted(deleted) == sorted(checkpoint_dir_name(s) for s in set(range(1, 7)) - expected)


def test_recipe_attention_choices_are_the_models_own() -> None:
    import typing

    from fractalgen.config import RunModelConfig
    from fractalgen.models.layers import ATTENTION_IMPLS

    assert typing.get_args(typing.get_type_hints(RunModelConfig)["attention"]) == ATTENTION_IMPLS
