"""Sweeps: Ray Tune over sampling settings with a tiny model on CPU, nested MLflow runs on a real
server, the best setting written back to the registered version, Parquet + plot exports; the search
space over guidance schedules (grid expansion, Optuna's conditional parameters), the released
setting as a baseline, the Pareto front (against a brute-force check) and its table and plot."""

from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np
import pytest
import torch

from fractalgen.config import ConfigError
from fractalgen.models import build_model, save_released
from fractalgen.platform.tuning.config import SweepEvalConfig, load_sweep_config
from fractalgen.platform.tuning.results import (
    pareto_front,
    pareto_rows,
    plot_fid_vs_cfg,
    plot_pareto,
    write_pareto_markdown,
    write_table,
)
from fractalgen.platform.tuning.space import optuna_space, param_space, released_config, trial_settings
from fractalgen.sampling_settings import SamplingSettings

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
    for name in ("sweep_demo.yaml", "sweep_fractalmar_in64.yaml", "sweep_schedules.yaml"):
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


SCHEDULES = [
    "space.cfg_schedule=[linear, power-cosine, interval, 'cosine']",
    "space.schedule_params={power-cosine: {exponent: [2.0, 3.0]}, interval: {start: [0.0, 0.25], end: [0.75]}}",
]


def test_grid_expands_each_family_and_lists_unset_values() -> None:
    cfg = load_sweep_config(
        str(ROOT / "configs" / "sweep_demo.yaml"),
        [*SCHEDULES, "space.lower_cfg=[null, 2.0]", "space.temperature_end=[null, 1.5]"],
    )
    specs = cfg.space.schedule_specs()
    assert specs == [
        "linear", "power-cosine:exponent=2", "power-cosine:exponent=3",
        "interval:start=0,end=0.75", "interval:start=0.25,end=0.75", "cosine",
    ]  # fmt: skip
    space = param_space(cfg)
    assert space["cfg_schedule"] == {"grid_search": specs} and space["lower_cfg"] == {
        "grid_search": [None, 2.0]
    }
    sizes = [len(v["grid_search"]) for v in space.values() if isinstance(v, dict)]
    assert cfg.space.grid_size() == int(np.prod(sizes)) == 2 * 2 * 6 * 2 * 2
    settings = trial_settings({"cfg": 2.0, "temperature": 1.0, "cfg_schedule": specs[1], "lower_cfg": None,
                               "temperature_end": 1.5, "num_iters": "4,2,2"})  # fmt: skip
    assert settings.to_tags() == SamplingSettings(cfg=2.0, temperature=1.0, cfg_schedule="power-cosine:exponent=2",
                                                  temperature_end=1.5, num_iters=(4, 2, 2)).to_tags()  # fmt: skip


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("space.cfg_schedule=[linear, 'power-cosine:exponent=-1']", "space.cfg_schedule[1]"),
        ("space.cfg_schedule=[linear, warp]", "space.cfg_schedule[1]"),
        ("space.schedule_params={interval: {start: [0.5]}}", "space.schedule_params.interval"),
        ("space.schedule_params={linear: {exponent: [2.0]}}", "space.schedule_params.linear.exponent"),
        ("space.lower_cfg=[null, 0.5]", "space.lower_cfg[1]"),
        ("space.lower_cfg_schedule=['interval:start=0.9,end=0.1']", "space.lower_cfg_schedule[0]"),
        ("space.temperature_end=[0.0]", "space.temperature_end[0]"),
        ("space.filter_threshold=[1.0]", "space.filter_threshold[0]"),
        ("space.cfg=[0.5]", "space.cfg[0]"),
    ],
)
def test_bad_space_values_name_the_key(override: str, named: str) -> None:
    """Every value goes through SamplingSettings; the message starts with the dotted key."""
    with pytest.raises(ConfigError) as err:
        load_sweep_config(str(ROOT / "configs" / "sweep_demo.yaml"), [override])
    assert str(err.value).startswith(named + ":"), err.value


def test_optuna_samples_only_the_chosen_familys_parameters() -> None:
    import optuna

    cfg = load_sweep_config(
        str(ROOT / "configs" / "sweep_fractalmar_in64.yaml"),
        [*SCHEDULES, "space.schedule_ranges={interval: {end: [0.5, 1.0]}}", "space.lower_cfg=[null, 3.0]"],
    )
    space = optuna_space(cfg)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(60):
        trial = study.ask()
        config = space(trial)
        family = trial.params["schedule"]
        seen.add(family)
        own = {k for k in trial.params if "." in k}
        assert own == {
            f"{family}.{p}"
            for p in {"power-cosine": ["exponent"], "interval": ["start", "end"]}.get(family, [])
        }
        settings = trial_settings({**trial.params, **config})  # the trial's setting builds
        assert str(settings.cfg_schedule) == config["cfg_schedule"]
        if family == "interval":
            assert 0.5 <= settings.cfg_schedule.end <= 1.0 and settings.cfg_schedule.start in (0.0, 0.25)
        study.tell(trial, float(len(trial.params)))
    assert seen == {"linear", "power-cosine", "interval", "cosine"}


def test_the_released_setting_comes_first_and_optuna_never_hears_of_it() -> None:
    from ray.tune.search.optuna import OptunaSearch

    from fractalgen.models import MODEL_CONFIGS
    from fractalgen.platform.tuning.space import released_first

    # the released cfg (6.5) is not a choice: Optuna's own points_to_evaluate would fail on it
    cfg = load_sweep_config(
        str(ROOT / "configs" / "sweep_fractalmar_in64.yaml"), [*SCHEDULES, "space.cfg=[4.0, 8.0]"]
    )
    point = released_config(MODEL_CONFIGS["fractalmar_in64"])
    assert trial_settings(point) == SamplingSettings().resolved(MODEL_CONFIGS["fractalmar_in64"])
    searcher = released_first(OptunaSearch(space=optuna_space(cfg), metric="fid", mode="min", seed=0), point)
    first, second = searcher.suggest("t0"), searcher.suggest("t1")
    assert first == point and second["released"] is False and "schedule" in second
    searcher.on_trial_result("t0", {"fid": 1.0, "training_iteration": 1})  # not forwarded: Optuna has no t0
    searcher.on_trial_complete("t0", {"fid": 1.0})
    searcher.on_trial_complete("t1", {"fid": 2.0})
    assert [t.value for t in searcher.searcher._ot_study.trials if t.value is not None] == [2.0]


def _dominated(pts: list[tuple[float, float]], i: int, among: list[int]) -> bool:
    """Brute force: some point is no worse in both (FID lower, the other higher) and not equal."""
    a, b = pts[i]
    return any(pts[j][0] <= a and pts[j][1] >= b and pts[j] != pts[i] for j in among)


def test_pareto_front_matches_brute_force() -> None:
    rng = np.random.default_rng(0)
    for _ in range(300):
        n = int(rng.integers(0, 14))
        pts = [(float(a), float(b)) for a, b in rng.integers(0, 5, size=(n, 2))]  # many ties
        if n and rng.random() < 0.3:
            pts[int(rng.integers(0, n))] = (float("nan"), 1.0)
        finite = [i for i, p in enumerate(pts) if all(np.isfinite(p))]

        assert pareto_front(pts) == [i for i in finite if not _dominated(pts, i, finite)], pts


def _row(i: int, fid: float, is_: float, family: str, *, released: bool = False, status: str = "completed",
         precision: float = float("nan")) -> dict:  # fmt: skip
    spec = {"power-cosine": "power-cosine:exponent=2", "interval": "interval:start=0,end=0.5"}.get(
        family, family
    )
    return {"trial_id": f"t{i}", "released": released, "cfg": 2.0, "temperature": 1.0, "cfg_schedule": spec,
            "schedule_family": family, "num_iters": "2,2", "lower_cfg": None, "lower_cfg_schedule": None,
            "temperature_end": None, "filter_threshold": 1e-4, "num_images": 8, "fid": fid, "inception_score": is_,
            "precision": precision, "recall": float("nan"), "sample_seconds_per_image": 0.01 * (i + 1),
            "status": status, "mlflow_run_id": f"r{i}", "error": ""}  # fmt: skip


def test_pareto_table_markdown_and_plot(tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    rows = [
        _row(0, 10.0, 2.0, "linear", released=True, precision=0.5),
        _row(1, 8.0, 1.5, "power-cosine", precision=0.4),
        _row(2, 9.0, 1.0, "interval", precision=0.6),  # dominated on IS, on the precision front
        _row(3, 12.0, 3.0, "interval", precision=0.1),
        _row(4, 1.0, 9.0, "linear", status="early-stopped"),  # fewer images: never on a front
    ]
    pareto = pareto_rows(rows)
    fronts = {(r["front"], r["trial_id"]) for r in pareto}
    assert {t for f, t in fronts if f == "fid-inception_score"} == {"t0", "t1", "t3"}
    assert {t for f, t in fronts if f == "fid-precision"} == {"t1", "t2"}
    assert not any(f == "fid-recall" for f, _ in fronts)
    table = pq.read_table(write_table(pareto, tmp_path / "pareto.parquet", ["front", "trial_id", "released"]))
    assert table.num_rows == 5 and table.column("released").to_pylist().count(True) == 1
    text = write_pareto_markdown(pareto, tmp_path / "pareto.md").read_text()
    assert "against IS" in text and "against precision" in text and "power-cosine:exponent=2" in text
    png = plot_pareto(rows, tmp_path / "pareto.png")
    from PIL import Image

    assert (
        png is not None and Image.open(png).size[0] > Image.open(png).size[1] * 1.5
    )  # two panels side by side


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
            "search.include_released=false",  # the grid alone (the released baseline: the test below)
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


@pytest.mark.slow
def test_sweep_over_schedule_families_pareto_and_sample_uses_the_winner(
    mlflow_env: str, inception_weights: Path, local_ray, tmp_path: Path
) -> None:
    """Three schedule families (power-cosine with two exponents) plus the released setting: nested
    trial runs, the Pareto table and plot on the parent run, the whole winning setting on the
    version, and ``fractalgen sample --model models:/NAME@candidate`` sampling with it."""
    import json

    import pyarrow.parquet as pq
    from mlflow.tracking import MlflowClient

    from fractalgen.cli import main
    from fractalgen.models import MODEL_CONFIGS
    from fractalgen.platform import registry as reg
    from fractalgen.platform.evaluation.inception import extract_features, load_inception
    from fractalgen.platform.evaluation.metrics import feature_statistics, save_statistics
    from fractalgen.platform.tuning.results import describe_result
    from fractalgen.platform.tuning.sweep import run_sweep

    torch.manual_seed(1)
    model = build_model("fractalmar_tiny16")
    with torch.no_grad():  # at initialisation the class barely matters: every schedule gives the same images
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    ckpt = save_released(model, tmp_path / "tiny.pth")
    name = f"sweep-sched-{uuid.uuid4().hex[:8]}"
    version = reg.register_checkpoint(str(ckpt), name, grid_images=0)
    client = MlflowClient(mlflow_env)
    # an earlier sweep's tag for a field this sweep leaves unset: it must not survive into the winner
    client.set_model_version_tag(name, version.version, "sampling.lower_cfg", "3.0")
    rng = np.random.default_rng(1)
    real = torch.from_numpy(rng.integers(0, 256, size=(6, 3, 16, 16)).astype(np.float32) / 255)
    feats, _ = extract_features(load_inception(inception_weights), real)
    reference = save_statistics(feature_statistics(feats), tmp_path / "ref.npz")  # with features: P/R

    cfg = load_sweep_config(
        None,
        [
            "name=schedules", f"model={version.model_uri}", f"storage_path={tmp_path / 'ray'}",
            "space.cfg=[2.0]", "space.temperature=[1.0]", "space.num_iters=[[2, 2]]",
            "space.cfg_schedule=[linear, power-cosine, 'interval:start=0.0,end=0.5']",
            "space.schedule_params={power-cosine: {exponent: [2.0, 3.0]}}",
            "space.temperature_end=[1.5]",
            f"eval.reference={reference}", f"eval.inception={inception_weights}", "eval.num_images=4",
            "eval.min_images=2", "eval.batch_size=2", "eval.precision_recall=true",
            "mlflow.experiment=sweep-schedule-tests",
        ],
    )  # fmt: skip
    result = run_sweep(cfg, progress=False)

    rows = result.rows
    assert len(rows) == 5 and result.best is not None, rows
    assert (
        sum(r["released"] for r in rows) == 1 and result.released["status"] == "completed"
    )  # never stopped early
    assert result.released["cfg_schedule"] == "linear" and result.released["num_iters"] == "4,4"
    assert {r["schedule_family"] for r in rows if not r["released"]} == {"linear", "power-cosine", "interval"}
    assert {r["cfg_schedule"] for r in rows} >= {"power-cosine:exponent=2", "power-cosine:exponent=3"}
    completed = [r for r in rows if r["status"] == "completed"]
    assert all(r["sample_seconds_per_image"] > 0 for r in completed)

    # the Pareto outputs: the table's fronts are exactly the brute-force non-dominated completed trials
    out = cfg.output_dir().absolute()
    pareto = pq.read_table(out / "pareto.parquet").to_pylist()
    for metric in ("inception_score", "precision", "recall"):
        mine = {r["trial_id"] for r in pareto if r["front"] == f"fid-{metric}"}
        expect = {
            r["trial_id"] for r in completed
            if not any(q["fid"] <= r["fid"] and q[metric] >= r[metric] and (q["fid"], q[metric]) != (r["fid"], r[metric])
                       for q in completed)
        }  # fmt: skip
        assert mine == expect and mine, (metric, pareto)
    assert all(r["sample_seconds_per_image"] > 0 for r in pareto)
    assert "Pareto front, FID (lower) against IS" in describe_result(result)
    assert (out / "pareto.md").read_text().count("## FID") == 3 and (out / "pareto.png").stat().st_size > 5000
    results = pq.read_table(out / "results.parquet")
    assert results.column("released").to_pylist().count(True) == 1
    assert "sample_seconds_per_image" in results.column_names

    # MLflow: trials nested under the parent; the parent holds every output
    exp = client.get_experiment_by_name("sweep-schedule-tests").experiment_id
    children = client.search_runs([exp], filter_string=f"tags.mlflow.parentRunId = '{result.parent_run_id}'")
    assert len(children) == 5 and all("sample_seconds_per_image" in c.data.metrics for c in children)
    assert sum(c.data.tags.get("fractalgen.released") == "true" for c in children) == 1
    for c in children:
        history = client.get_metric_history(c.info.run_id, "fid")
        assert [m.step for m in history] in ([2], [2, 4]), history  # step = images
        stopped = c.data.tags.get("fractalgen.early_stopped") == "true"
        assert c.info.status == ("KILLED" if stopped else "FINISHED")
    artifacts = {a.path for a in client.list_artifacts(result.parent_run_id, "sweep")}
    assert {
        f"sweep/{f}"
        for f in ("results.parquet", "fid_vs_cfg.png", "pareto.parquet", "pareto.md", "pareto.png")
    } <= artifacts

    # the registry: the whole winning setting, and nothing of the earlier sweep
    tags = client.get_model_version(name, version.version).tags
    winner = SamplingSettings.from_tags(tags)  # whichever trial won (the released one may)
    assert winner == trial_settings(result.best).resolved(MODEL_CONFIGS["fractalmar_tiny16"])
    assert str(winner.cfg_schedule) == result.best["cfg_schedule"] and winner.lower_cfg is None
    assert winner.temperature_end == (None if result.best["released"] else 1.5)
    assert tags["sweep.run_id"] == result.parent_run_id

    # fractalgen sample through the alias samples with it (sample.json records what it used)
    samples = tmp_path / "samples"
    assert (
        main(
            ["sample", "--model", f"models:/{name}@candidate", "--labels", "0,1", "--out", str(samples), "-q"]
        )
        == 0
    )
    used = json.loads((samples / "sample.json").read_text())["settings"]
    assert used == {k.split(".", 1)[1]: v for k, v in winner.to_tags().items()}


@pytest.mark.slow
def test_optuna_sweep_with_conditional_schedule_parameters_and_the_released_setting(
    mlflow_env: str, inception_weights: Path, local_ray, tmp_path: Path
) -> None:
    """Optuna (define-by-run space, checkpointed by Tune with plain pickle) plus the released
    setting, which is not one of Optuna's choices: every trial completes without early stopping."""
    from fractalgen.platform.evaluation.inception import extract_features, load_inception
    from fractalgen.platform.evaluation.metrics import feature_statistics, save_statistics
    from fractalgen.platform.tuning.sweep import run_sweep

    torch.manual_seed(2)
    ckpt = save_released(build_model("fractalmar_tiny16"), tmp_path / "tiny.pth")
    real = torch.from_numpy(
        np.random.default_rng(2).integers(0, 256, size=(4, 3, 16, 16)).astype(np.float32) / 255
    )
    reference = save_statistics(
        feature_statistics(extract_features(load_inception(inception_weights), real)[0]), tmp_path / "ref.npz"
    )
    cfg = load_sweep_config(
        None,
        [
            "name=optuna", f"model={ckpt}", f"storage_path={tmp_path / 'ray'}", "search.algorithm=optuna",
            "search.num_samples=3", "space.cfg=[3.0, 4.0]", "space.num_iters=[[2, 2]]",
            "space.cfg_schedule=[power-cosine, interval]",
            "space.schedule_ranges={power-cosine: {exponent: [1.0, 4.0]}}",
            "space.schedule_params={interval: {start: [0.0, 0.25], end: [0.5, 1.0]}}",
            f"eval.reference={reference}", f"eval.inception={inception_weights}", "eval.num_images=2",
            "eval.min_images=2", "eval.batch_size=2", "mlflow.experiment=sweep-optuna-tests",
        ],
    )  # fmt: skip
    result = run_sweep(cfg, progress=False)
    assert len(result.rows) == 4 and all(r["status"] == "completed" for r in result.rows), result.rows
    released = [r for r in result.rows if r["released"]]
    assert len(released) == 1 and released[0]["cfg"] == 2.0 and released[0]["cfg_schedule"] == "linear"
    for r in (r for r in result.rows if not r["released"]):
        assert r["schedule_family"] in ("power-cosine", "interval") and r["cfg"] in (3.0, 4.0), r
        params = trial_settings(r).cfg_schedule.params()
        if r["schedule_family"] == "power-cosine":
            assert 1.0 <= params["exponent"] <= 4.0
        else:
            assert params["start"] in (0.0, 0.25) and params["end"] in (0.5, 1.0)
    assert result.pareto and result.pareto_plot is not None and result.pareto_plot.is_file()
