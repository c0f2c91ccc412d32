"""``fractalgen demo`` (what ``make demo`` runs): the training platform end to end on a CPU machine.

Steps, each the same code a cluster run uses:
1. build the embedded dataset (``fractalgen.pipelines.embedded``: the 8 ``DEMO_CLASSES`` of the
   photographs scikit-image ships, 64 images each, 32x32, MDS shards) in ``<out>/data``;
2. train ``configs/demo.yaml`` (``fractalmar_demo32``) with ``fractalgen.platform.training.driver``: a local Ray,
   2 Ray Train workers, DeepSpeed ZeRO-2 on CPU with gloo, checkpoints in ``<out>/checkpoints``,
   MLflow in the SQLite store ``<out>/mlflow.db``;
3. export the last checkpoint's consolidated fp32 weights in the released format
   (``<out>/fractalmar_demo32.pth``);
4. show that it learned (``learning_evidence``): sample the initial and the trained weights with the
   same seed (``<out>/samples_before_after.png``; after: ``<out>/samples.png``), score how many
   samples carry their own class's colours and the bits/dim at both ends
   (``fractalgen.platform.evaluation.learning``), draw the loss curve (``<out>/learning_curve.png``),
   and log all of it to the training run in MLflow (artifacts ``learning/``, metrics ``learning.*``);
5. register, sweep and promote the model (``registry_demo.demo_registry_steps``: the final weights
   and those of the first checkpoint, as two versions);
6. print the result, where everything is and how to open the MLflow UI.

Running it again resumes the finished run (nothing left to train) and prints the same; ``--fresh``
starts over.
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fractalgen import storage
from fractalgen.cli import CLIError
from fractalgen.cli.registry_demo import demo_registry_steps

if TYPE_CHECKING:
    from fractalgen.config import TrainRunConfig
    from fractalgen.platform.artifacts.run_plan import WorkerPlan
    from fractalgen.platform.training.driver import TrainOutcome

DEFAULT_OUT = "runs/demo"
SAMPLES_PER_CLASS = 6  # columns of the before/after grids, and images per class the check scores
NLL_IMAGES = 64  # training images for bits/dim at the start and the end
LEARNING_ARTIFACTS = "learning"  # the training run's MLflow artifact folder for the evidence


def default_config() -> Path:
    """``configs/demo.yaml`` of the checkout this package runs from (or of the working directory)."""
    here = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"
    return here if here.is_file() else Path("configs/demo.yaml")


def run_demo(
    out: str = DEFAULT_OUT,
    *,
    config: str | os.PathLike[str] | None = None,
    overrides: list[str] | None = None,
    fresh: bool = False,
    registry: bool = True,
) -> dict[str, str]:
    """Run the demo into ``out``; returns the paths it wrote (dataset, run, weights, grid, MLflow store)."""
    from fractalgen.cli.train import load_run_config  # deferred: heavy import
    from fractalgen.models import get_config  # deferred: heavy import
    from fractalgen.pipelines.embedded import DEMO_CLASSES, build_embedded_dataset  # deferred: heavy import
    from fractalgen.platform.artifacts.checkpoints import export_consolidated  # deferred: heavy import
    from fractalgen.platform.training.driver import (
        describe_outcome,
        plan_run,
        run_training,
    )  # deferred: heavy import

    out = os.path.abspath(out)
    data, checkpoints = os.path.join(out, "data"), os.path.join(out, "checkpoints")
    store = os.path.join(out, "mlflow.db")
    cfg = load_run_config(
        str(config or default_config()),
        [
            f"data.train_uri={data}",
            f"checkpoint.storage_path={checkpoints}",
            f"mlflow.tracking_uri=sqlite:///{store}",
            *(overrides or []),
        ],
    )
    if fresh:
        shutil.rmtree(os.path.join(checkpoints, cfg.name), ignore_errors=True)

    t0 = time.perf_counter()
    print(f"[demo] 1/5 embedded dataset -> {data}", flush=True)
    size = get_config(cfg.model.name).img_size  # 32 for fractalmar_demo32
    summary = build_embedded_dataset(data, size=size, classes=DEMO_CLASSES, images_per_class=64)
    print(
        f"[demo]     {summary['num_images']} images, {summary['num_classes']} classes ({time.perf_counter() - t0:.0f} s)",
        flush=True,
    )

    print(
        f"[demo] 2/5 training {cfg.model.name}: {cfg.cluster.num_workers} Ray workers, DeepSpeed ZeRO-"
        f"{cfg.train.zero_stage} on CPU (gloo), {cfg.train.epochs:g} epochs",
        flush=True,
    )
    plan = plan_run(cfg)
    outcome = run_training(cfg, plan=plan)

    weights = os.path.join(out, f"{cfg.model.name}.pth")
    print(f"[demo] 3/5 consolidated fp32 weights -> {weights}", flush=True)
    final = outcome.checkpoint or plan.run_uri
    export_consolidated(final, weights)
    extra = []
    earlier = sorted(n for n in storage.list_dirs(plan.run_uri) if n.startswith("checkpoint_"))[:-1]
    if earlier:  # a second version for the registry to compare
        extra.append(os.path.join(out, f"{cfg.model.name}-{earlier[0]}.pth"))
        export_consolidated(os.path.join(plan.run_uri, earlier[0]), extra[0])

    print("[demo] 4/5 evidence of learning: samples before/after training, bits/dim, the curve", flush=True)
    evidence = learning_evidence(cfg, plan, outcome, weights, data, out)
    print(f"[demo]     {evidence['check'].describe()}", flush=True)

    review = None
    if registry and outcome.tracking_uri:
        print("[demo] 5/5 registry: register, sweep sampling settings, promote the best version", flush=True)
        result = demo_registry_steps(
            out,
            weights,
            tracking_uri=outcome.tracking_uri,
            data_uri=data,
            training_run_id=outcome.mlflow_run_id,
            extra_weights=extra,
        )
        review = result.get("review_html")

    elapsed = time.perf_counter() - t0
    check = evidence["check"]
    print(
        "\n".join(
            [
                "",
                describe_outcome(outcome, plan),
                f"  dataset:     {data}",
                f"  weights:     {weights}  (fractalgen.models.load_released)",
                "",
                f"demo finished in {elapsed / 60:.1f} min: {cfg.model.name} trained {outcome.step} steps on "
                f"{check.num_classes} classes",
                f"  result:      {check.describe()}",
                f"  curve:       {evidence['curve']}  (training loss in bits/dim over the steps)",
                f"  samples:     {evidence['before_after']}  (before and after training, the same seed;"
                " training images beside)",
                f"               {evidence['samples']}  (after; {evidence['per_class']} per class, guidance "
                f"{cfg.eval.cfg}, temperature {cfg.eval.temperature})",
                *(
                    [f"  review:      {review}  (registry: versions, sampling sweep, champion)"]
                    if review
                    else []
                ),
                f"  MLflow UI:   .venv/bin/mlflow ui --backend-store-uri sqlite:///{store} --port 5000",
                f"               then http://127.0.0.1:5000: experiment '{cfg.mlflow.experiment}', run '{cfg.name}'"
                " (metrics learning.*, the curve and the grids under artifacts/learning)",
            ]
        ),
        flush=True,
    )
    return {
        "data": data,
        "run": outcome.run_uri,
        "weights": weights,
        "samples": evidence["samples"],
        "before_after": evidence["before_after"],
        "curve": evidence["curve"],
        "mlflow": store,
    }


def learning_evidence(
    cfg: TrainRunConfig,
    plan: WorkerPlan,
    outcome: TrainOutcome,
    weights: str,
    data: str,
    out: str,
    *,
    per_class: int = SAMPLES_PER_CLASS,
    nll_images: int = NLL_IMAGES,
) -> dict[str, Any]:
    """Sample the initial weights (rebuilt: the worker seeds them with ``train.seed``; a recipe that
    starts from pretrained weights, ``finetune.init``, is not what the demo runs) and the trained
    ones with the same labels and seed; score both with ``evaluation.learning`` against the training
    images, measure bits/dim on ``nll_images`` of them; write the before/after grids and the curve
    to ``out`` and log them and the figures to the training run's MLflow run (``learning/``)."""
    import torch  # deferred: heavy import

    from fractalgen.platform.artifacts.run_plan import build_run_model  # deferred: heavy import
    from fractalgen.platform.evaluation.data import (
        evaluate_nll,
        read_labelled_images,
    )  # deferred: heavy import
    from fractalgen.platform.evaluation.learning import (  # deferred: heavy import
        LearningCheck,
        class_profiles,
        labelled_grid,
        learning_curve_png,
        own_class_share,
        side_by_side,
    )
    from fractalgen.platform.generation.sampling import generate_images, load_model  # deferred: heavy import

    with torch.random.fork_rng():
        torch.manual_seed(cfg.train.seed)  # as train_loop_per_worker: the weights training started from
        initial = build_run_model(plan).eval()
    final = load_model(weights)
    names = list(plan.class_names) or [str(c) for c in range(plan.num_classes)]
    labels = torch.arange(plan.num_classes).repeat_interleave(per_class)  # class-major: one row per class
    settings = cfg.eval.sampling(unconditional=plan.num_classes == 1)
    references, reference_labels = read_labelled_images(data)
    profiles = class_profiles(references, reference_labels, plan.num_classes)
    shares, bpds, panels = [], [], []
    for model, title in ((initial, "before training (step 0)"), (final, f"after {outcome.step} steps")):
        with torch.no_grad():
            images = generate_images(model, labels, settings, batch_size=len(labels), seed=cfg.eval.seed)
        shares.append(own_class_share(images, labels, profiles))
        bpds.append(evaluate_nll(model, data, max_images=nll_images, progress=False)["nll_bpd"])
        panels.append(labelled_grid(images, names, per_class=per_class, title=title))
    check = LearningCheck(
        num_classes=plan.num_classes,
        num_images=len(labels),
        share_before=shares[0],
        share_after=shares[1],
        bpd_before=bpds[0],
        bpd_after=bpds[1],
    )

    steps, bpd = _metric_history(outcome, "bpd")
    files = {
        "samples": os.path.join(out, "samples.png"),
        "before_after": os.path.join(out, "samples_before_after.png"),
        "curve": os.path.join(out, "learning_curve.png"),
    }
    panels[1].save(files["samples"])
    real = torch.cat([references[reference_labels == c][:per_class] for c in range(plan.num_classes)])
    panels.append(labelled_grid(real, names, per_class=per_class, title="training images"))
    side_by_side(panels).save(files["before_after"])
    with open(files["curve"], "wb") as f:
        f.write(
            learning_curve_png(
                steps,
                bpd,
                evaluated=[(0, check.bpd_before), (outcome.step, check.bpd_after)],
                title=f"{cfg.name}: {cfg.model.name}, {plan.num_classes} classes",
            )
        )
    if outcome.tracking_uri and outcome.mlflow_run_id:
        from mlflow.tracking import MlflowClient  # deferred: heavy import

        client = MlflowClient(outcome.tracking_uri)
        for key, value in check.metrics().items():
            client.log_metric(outcome.mlflow_run_id, key, value, step=outcome.step)
        for path in files.values():
            client.log_artifact(outcome.mlflow_run_id, path, LEARNING_ARTIFACTS)
    return {**files, "check": check, "per_class": per_class}


def _metric_history(outcome: TrainOutcome, key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of a metric of the training run in MLflow, else of its final metrics."""
    if outcome.tracking_uri and outcome.mlflow_run_id:
        from mlflow.tracking import MlflowClient  # deferred: heavy import

        history = MlflowClient(outcome.tracking_uri).get_metric_history(outcome.mlflow_run_id, key)
        points = sorted({m.step: m.value for m in history}.items())
        if points:
            return [s for s, _ in points], [v for _, v in points]
    return ([outcome.step], [outcome.metrics[key]]) if key in outcome.metrics else ([], [])


def _demo(args: argparse.Namespace) -> int:
    from fractalgen.platform.training.driver import PlanError, TrainError  # deferred: heavy import

    try:
        run_demo(
            args.out, config=args.config, overrides=args.set, fresh=args.fresh, registry=not args.no_registry
        )
    except PlanError as err:
        raise CLIError(str(err)) from None
    except TrainError as err:
        print(f"fractalgen demo: error: {err}")
        return 1
    return 0


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "demo",
        help="build the embedded dataset, train the demo recipe on local Ray + DeepSpeed, show that it learned (before/after samples, loss curve)",
        description=__doc__.split("\n\n", 1)[1] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    p.add_argument("--config", help="recipe (default configs/demo.yaml)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a recipe value (repeatable)")
    p.add_argument("--fresh", action="store_true", help="delete the previous demo run and train from scratch")
    p.add_argument(
        "--no-registry", action="store_true", help="stop after training (skip register/sweep/promote)"
    )
    p.set_defaults(func=_demo)
