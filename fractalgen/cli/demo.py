"""``fractalgen demo`` (what ``make demo`` runs): the training platform end to end on a CPU machine.

Steps, each the same code a cluster run uses:
1. build the embedded dataset (``fractalgen.pipelines.embedded``: 16 classes of the photographs
   scikit-image ships, 32x32, MDS shards) in ``<out>/data``;
2. train ``configs/demo.yaml`` (``fractalmar_demo32``) with ``fractalgen.platform.training.driver``: a local Ray,
   2 Ray Train workers, DeepSpeed ZeRO-2 on CPU with gloo, checkpoints in ``<out>/checkpoints``,
   MLflow in the SQLite store ``<out>/mlflow.db``;
3. export the last checkpoint's consolidated fp32 weights in the released format
   (``<out>/fractalmar_demo32.pth``);
4. copy the class-conditional sample grid of the final evaluation to ``<out>/samples.png``;
5. register, sweep and promote the model (``registry_demo.demo_registry_steps``: the final weights
   and those of the first checkpoint, as two versions);
6. print where everything is and how to open the MLflow UI.

Running it again resumes the finished run (nothing left to train) and prints the same; ``--fresh``
starts over.
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path

from fractalgen.cli import CLIError

DEFAULT_OUT = "runs/demo"


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
    from fractalgen import storage
    from fractalgen.cli.train import load_run_config
    from fractalgen.pipelines.embedded import build_embedded_dataset
    from fractalgen.platform.artifacts.checkpoints import export_consolidated
    from fractalgen.platform.training.driver import describe_outcome, plan_run, run_training
    from fractalgen.platform.training.worker import SAMPLES_PNG

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
    summary = build_embedded_dataset(data, size=32)
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

    grid = os.path.join(out, "samples.png")
    print(f"[demo] 4/5 class-conditional sample grid -> {grid}", flush=True)
    shutil.copyfile(os.path.join(final, SAMPLES_PNG), grid)

    review = None
    if registry and outcome.tracking_uri:
        from fractalgen.cli.registry_demo import demo_registry_steps

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
    print(
        "\n".join(
            [
                "",
                f"demo finished in {elapsed / 60:.1f} min",
                describe_outcome(outcome, plan),
                f"  dataset:     {data}",
                f"  weights:     {weights}  (fractalgen.models.load_released)",
                f"  samples:     {grid}  (one image per class, guidance {cfg.eval.cfg})",
                *([f"  review:      {review}"] if review else []),
                f"  browse:      http://127.0.0.1:5000 once `mlflow ui` runs (experiment '{cfg.mlflow.experiment}', run '{cfg.name}')",
            ]
        ),
        flush=True,
    )
    return {"data": data, "run": outcome.run_uri, "weights": weights, "samples": grid, "mlflow": store}


def _demo(args: argparse.Namespace) -> int:
    from fractalgen.platform.training.driver import PlanError, TrainError

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
        help="build the embedded dataset, train the demo recipe on local Ray + DeepSpeed, sample a grid",
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
