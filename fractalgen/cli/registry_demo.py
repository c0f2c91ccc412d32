"""The registry part of ``make demo``: register the demo model, sweep its sampling settings, promote
the best version to ``champion`` and print the review. ``fractalgen demo`` calls
``demo_registry_steps`` after training and exporting the weights.

Terms (see ``fractalgen.platform.registry`` and ``fractalgen.platform.tuning.sweep``): the demo registers the exported weights (and any
``extra_weights``, e.g. an earlier checkpoint) as versions of ``fractalgen-demo`` with bits/dim on
the demo data; the sweep (``configs/sweep_demo.yaml``) runs on the newest version and writes its best
setting to it; every other version registered here is scored at that setting with the same image
count, so all FIDs compare like with like; the version with the lowest FID becomes ``champion``.

Inception weights: the user's (``--inception``, ``FRACTALGEN_INCEPTION_WEIGHTS`` or a cache, see
``evaluation/inception.py``); without them the demo writes a randomly initialised network to
``<out>/inception-random.pth`` and says so: its FIDs rank the settings of this demo only and are not
comparable to published numbers.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fractalgen.cli.eval import evaluate_fid
from fractalgen.platform import registry

DEMO_MODEL_NAME = "fractalgen-demo"


def _default_sweep_config() -> Path:
    here = Path(__file__).resolve().parents[2] / "configs" / "sweep_demo.yaml"
    return here if here.is_file() else Path("configs/sweep_demo.yaml")


def _inception(out: Path, inception: str | None) -> tuple[Path, bool]:
    from fractalgen.platform.evaluation.inception import (  # deferred: heavy import
        InceptionWeightsMissing,
        resolve_weights,
        write_random_weights,
    )

    try:
        return resolve_weights(inception), False
    except InceptionWeightsMissing as err:
        if inception is not None:
            raise
        path = out / "inception-random.pth"
        if not path.is_file():
            write_random_weights(path)
        print(
            f"[demo] no Inception weights found ({str(err).split('(looked at', 1)[0].strip()}): using a randomly "
            f"initialised FID Inception ({path}); the demo's FIDs rank its own settings only",
            flush=True,
        )
        return path, True


def demo_registry_steps(
    out: str | os.PathLike[str],
    weights: str | os.PathLike[str],
    *,
    tracking_uri: str,
    data_uri: str,
    training_run_id: str | None = None,
    extra_weights: Sequence[str | os.PathLike[str]] = (),
    model_name: str = DEMO_MODEL_NAME,
    sweep_config: str | os.PathLike[str] | None = None,
    sweep_overrides: Sequence[str] = (),
    inception: str | None = None,
    reference_images: int = 64,
    nll_images: int = 32,
) -> dict[str, Any]:
    """Register ``weights`` (+ ``extra_weights``) as versions of ``model_name`` in ``tracking_uri``,
    sweep, promote the best version to ``champion`` and print the review.

    ``out``: the demo folder (reference statistics, sweep results, review HTML go there);
    ``data_uri``: the demo dataset (reference statistics for FID and bits/dim).
    Returns ``{"versions", "champion", "sweep_table", "sweep_plot", "review_html", "reference"}``.
    """
    from fractalgen.models import load_released  # deferred: heavy import
    from fractalgen.platform.evaluation.data import (
        evaluate_nll,
        reference_statistics,
    )  # deferred: heavy import
    from fractalgen.platform.evaluation.inception import load_inception  # deferred: heavy import
    from fractalgen.platform.evaluation.metrics import (
        load_statistics,
        save_statistics,
    )  # deferred: heavy import
    from fractalgen.platform.generation.sources import resolve_model_source  # deferred: heavy import
    from fractalgen.platform.tuning.config import load_sweep_config  # deferred: heavy import
    from fractalgen.platform.tuning.results import describe_result  # deferred: heavy import
    from fractalgen.platform.tuning.sweep import run_sweep  # deferred: heavy import

    out = Path(out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    os.environ["MLFLOW_TRACKING_URI"] = tracking_uri  # the sweep's Ray trials read it too

    print("[demo] registry 1/5 Inception weights and reference statistics", flush=True)
    inception_path, random_net = _inception(out, inception)
    ref_path = out / "reference_stats.npz"
    reference = load_statistics(ref_path) if ref_path.is_file() else None
    if reference is None or reference.meta.get("inception") != str(inception_path):
        stats = reference_statistics(
            data_uri,
            load_inception(inception_path),
            max_images=reference_images,
            keep_features=0,
            progress=False,
        )
        stats.meta.update(source=data_uri, inception=str(inception_path), random_inception=random_net)
        save_statistics(stats, ref_path)

    print(f"[demo] registry 2/5 registering {weights} as a version of {model_name}", flush=True)
    versions = []
    for i, path in enumerate([*extra_weights, weights]):
        nll = evaluate_nll(
            load_released(path), data_uri, batch_size=16, max_images=nll_images, progress=False
        )
        rv = registry.register_checkpoint(
            str(path), model_name, tracking_uri=tracking_uri, training_run_id=training_run_id,
            metrics={"nll_bpd": nll["nll_bpd"]}, grid_images=16,
            description="fractalgen demo" + (" (earlier checkpoint)" if i < len(extra_weights) else ""),
        )  # fmt: skip
        versions.append(rv)
        print(f"[demo]     {rv.model_uri}: {nll['nll_bpd']:.3f} bits/dim", flush=True)
    newest = versions[-1]

    print(
        "[demo] registry 3/5 sweep of guidance scale x temperature (Ray Tune, ASHA over images)", flush=True
    )
    cfg = load_sweep_config(
        str(sweep_config or _default_sweep_config()),
        [
            f"model={newest.model_uri}",
            f"eval.reference={ref_path}",
            f"eval.inception={inception_path}",
            f"storage_path={out / 'sweeps'}",
            f"mlflow.tracking_uri={tracking_uri}",
            *sweep_overrides,
        ],
    )
    result = run_sweep(cfg, progress=False)
    print(describe_result(result), flush=True)
    if result.best is None:
        raise RuntimeError("the demo sweep finished no trial; see the Ray Tune output above")
    best = result.best_settings
    config = load_released(weights).config
    registry.record_metrics(
        model_name, newest.version, {"fid": result.best["fid"], "inception_score": result.best["inception_score"]},
        settings=best.resolved(config), tracking_uri=tracking_uri,
    )  # fmt: skip

    print(
        "[demo] registry 4/5 scoring the other versions at the best setting, promoting the best", flush=True
    )
    reference = load_statistics(ref_path)
    for rv in versions[:-1]:
        with tempfile.TemporaryDirectory(prefix="fractalgen-demo-") as work:
            src = resolve_model_source(rv.model_uri, work_dir=work, tracking_uri=tracking_uri)
            metrics, _ = evaluate_fid(
                src.path, reference, inception_path, num_images=cfg.eval.num_images, settings=best,
                batch_size=cfg.eval.batch_size, seed=cfg.eval.seed, precision_recall_images=0, progress=False,
            )  # fmt: skip
        registry.record_metrics(
            model_name, rv.version, {"fid": metrics.fid, "inception_score": metrics.inception_score},
            settings=best.resolved(config), tracking_uri=tracking_uri,
        )  # fmt: skip
    scored = {}
    for rv in versions:
        tags = registry.get_version(model_name, rv.version, c=registry.client(tracking_uri)).tags
        scored[rv.version] = float(tags.get("metrics.fid", "inf"))
    champion = min(scored, key=scored.get)
    registry.promote(model_name, champion, yes=True, tracking_uri=tracking_uri)

    print("[demo] registry 5/5 review", flush=True)
    html_path = out / "registry_review.html"
    registry.review(model_name, html_path=html_path, tracking_uri=tracking_uri)
    return {
        "versions": [rv.model_uri for rv in versions],
        "champion": f"models:/{model_name}/{champion}",
        "sweep_table": str(result.table),
        "sweep_plot": str(result.plot) if result.plot else None,
        "review_html": str(html_path),
        "reference": str(ref_path),
    }
