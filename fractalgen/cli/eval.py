"""``fractalgen eval {nll,fid,stats}``: bits/dim on a shard set, FID/IS/precision/recall of generated
images against reference statistics, and reference statistics from validation shards.

Terms are defined in ``metrics.py`` (FID, IS, precision/recall, reference files), ``data.py``
(bits/dim, reference statistics) and ``generate.py`` (model sources, sampling settings, seeds).
``--record`` stores the results on a registered model version (``models:/NAME/VERSION`` sources):
metrics on the version's run and as ``metrics.*`` tags the registry review shows.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from fractalgen.cli import CLIError
from fractalgen.pipelines import DataError
from fractalgen.platform import registry

log = logging.getLogger(__name__)


def _resolve_source(model: str, work: str):
    from fractalgen.models import CheckpointError  # deferred: heavy import
    from fractalgen.platform.generation.sources import resolve_model_source  # deferred: heavy import

    try:
        return resolve_model_source(model, work_dir=work)
    except (FileNotFoundError, ValueError, CheckpointError) as err:
        raise CLIError(str(err)) from None


def _load_inception(uri: str | None, device: Any):
    from fractalgen.platform.evaluation.inception import (  # deferred: heavy import
        InceptionWeightsError,
        InceptionWeightsMissing,
        load_inception,
    )

    try:
        return load_inception(uri, device=device)
    except (InceptionWeightsMissing, InceptionWeightsError) as err:
        raise CLIError(str(err)) from None


def _inception_path(uri: str | None) -> Path:
    from fractalgen.platform.evaluation.inception import (
        InceptionWeightsMissing,
        resolve_weights,
    )  # deferred: heavy import

    try:
        return resolve_weights(uri)
    except InceptionWeightsMissing as err:
        raise CLIError(str(err)) from None


def _print_metrics(title: str, metrics: dict[str, float]) -> None:
    print(title)
    for key, value in metrics.items():
        text = f"{value:.0f}" if key.startswith("num_") else f"{value:.4f}"
        print(f"  {key:<22} {text}")


def _write_json(path: str | None, payload: dict[str, Any]) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(payload, indent=2))
        print(f"wrote {path}")


def _record(source: Any, metrics: dict[str, float], prefix: str, settings: Any = None) -> None:
    if source.registered_name is None:
        raise CLIError(
            "--record needs a registered model source (models:/NAME/VERSION or models:/NAME@ALIAS)"
        )
    registry.record_metrics(source.registered_name, source.version, metrics, prefix=prefix, settings=settings)
    print(f"recorded on {source.registered_name} version {source.version}")


# ------------------------------------------------------------------------------------------ nll
def run_nll(args: argparse.Namespace) -> int:
    from fractalgen.models import CheckpointError  # deferred: heavy import
    from fractalgen.platform.evaluation.data import evaluate_nll  # deferred: heavy import
    from fractalgen.platform.generation.sampling import load_model, pick_device  # deferred: heavy import

    with tempfile.TemporaryDirectory(prefix="fractalgen-eval-") as work:
        source = _resolve_source(args.model, work)
        try:
            model = load_model(source.path, pick_device(args.device))
        except CheckpointError as err:
            raise CLIError(str(err)) from None
        try:
            metrics = evaluate_nll(
                model, args.data, batch_size=args.batch_size, num_passes=args.num_passes,
                max_images=args.max_images, endpoint=args.s3_endpoint_url, progress=not args.quiet,
            )  # fmt: skip
        except (DataError, FileNotFoundError, ValueError) as err:
            raise CLIError(str(err)) from None
        _print_metrics(f"bits/dim of {args.model} on {args.data}:", metrics)
        _write_json(args.out, {"model": args.model, "data": args.data, **metrics})
        if args.record:
            _record(source, {"nll_bpd": metrics["nll_bpd"]}, prefix="")
    return 0


# ------------------------------------------------------------------------------------------ stats
def run_stats(args: argparse.Namespace) -> int:
    from fractalgen.platform.evaluation.data import reference_statistics  # deferred: heavy import
    from fractalgen.platform.evaluation.metrics import save_statistics  # deferred: heavy import
    from fractalgen.platform.generation.sampling import pick_device  # deferred: heavy import

    inception = _load_inception(args.inception, pick_device(args.device))
    try:
        stats = reference_statistics(
            args.data, inception, max_images=args.max_images, batch_size=args.batch_size,
            keep_features=args.keep_features, endpoint=args.s3_endpoint_url, progress=not args.quiet,
        )  # fmt: skip
    except (DataError, FileNotFoundError, ValueError) as err:
        raise CLIError(str(err)) from None
    path = save_statistics(stats, args.out)
    kept = 0 if stats.features is None else len(stats.features)
    print(
        f"wrote {path}: statistics of {stats.num_images} images ({kept} feature vectors kept for precision/recall)"
    )
    return 0


# ------------------------------------------------------------------------------------------ fid
def evaluate_fid(
    model_path: str | os.PathLike[str],
    reference: Any,
    inception_path: str | os.PathLike[str],
    *,
    num_images: int,
    settings: Any,
    batch_size: int = 64,
    seed: int = 0,
    num_classes: int | None = None,
    num_workers: int = 0,
    gpus_per_worker: float = 1.0,
    device: str | None = None,
    keep_images: bool = False,
    precision_recall_images: int | None = 10_000,
    progress: bool = True,
) -> tuple[Any, dict[str, Any]]:
    """Generate ``num_images`` with balanced classes and score them against ``reference``
    (``metrics.Statistics``). Returns ``(SampleMetrics, outputs)`` (``outputs``: features, logits and,
    with ``keep_images``, uint8 images in ADM's NHWC layout)."""
    from fractalgen.models.checkpoint import config_from_checkpoint, read_checkpoint  # deferred: heavy import
    from fractalgen.platform.evaluation.metrics import compute_metrics  # deferred: heavy import
    from fractalgen.platform.generation.sampling import (
        GenerationJob,
        balanced_labels,
        generate_features,
    )  # deferred: heavy import

    if num_classes is None:
        num_classes = config_from_checkpoint(read_checkpoint(model_path))[1].num_classes
    job = GenerationJob(
        labels=balanced_labels(num_images, num_classes), settings=settings, batch_size=batch_size, seed=seed,
        keep_images=keep_images,
    )  # fmt: skip
    outputs = generate_features(
        model_path, inception_path, job, num_workers=num_workers, gpus_per_worker=gpus_per_worker,
        device=device, progress=progress,
    )  # fmt: skip
    metrics = compute_metrics(
        outputs["features"], outputs["logits"], reference, precision_recall_images=precision_recall_images
    )
    return metrics, outputs


def _default_workers(args: argparse.Namespace) -> int:
    """``--workers``, else: a Ray cluster (RAY_ADDRESS) or several local GPUs -> one worker per GPU
    (-1, resolved once Ray is up); one GPU or none -> this process (0)."""
    if args.workers is not None:
        return args.workers
    import torch  # deferred: heavy import

    return -1 if os.environ.get("RAY_ADDRESS") or torch.cuda.device_count() > 1 else 0


def run_fid(args: argparse.Namespace) -> int:
    import numpy as np  # deferred: heavy import

    from fractalgen.cli.sample import settings_from_args  # deferred: heavy import
    from fractalgen.models import CheckpointError, load_released  # deferred: heavy import
    from fractalgen.platform.evaluation.inception import extract_features  # deferred: heavy import
    from fractalgen.platform.evaluation.metrics import load_statistics  # deferred: heavy import
    from fractalgen.platform.generation.sampling import pick_device  # deferred: heavy import

    if args.num_images < 2:
        raise CLIError("--num-images must be >= 2 for FID")
    with tempfile.TemporaryDirectory(prefix="fractalgen-eval-") as work:
        source = _resolve_source(args.model, work)
        inception_path = _inception_path(args.inception)
        settings = settings_from_args(args, source)
        try:
            config = load_released(source.path).config
        except CheckpointError as err:
            raise CLIError(str(err)) from None
        device = pick_device(args.device)
        try:
            if args.reference.endswith(".npz"):
                inception = None

                def extractor(images):
                    nonlocal inception
                    inception = inception or _load_inception(str(inception_path), device)
                    return extract_features(inception, images, batch_size=args.batch_size)[0]

                reference = load_statistics(args.reference, extractor=extractor, max_images=args.pr_images)
            else:
                from fractalgen.platform.evaluation.data import reference_statistics  # deferred: heavy import

                reference = reference_statistics(
                    args.reference, _load_inception(str(inception_path), device), max_images=args.reference_images,
                    batch_size=args.batch_size, keep_features=args.pr_images, progress=not args.quiet,
                )  # fmt: skip
        except (FileNotFoundError, ValueError) as err:
            raise CLIError(str(err)) from None
        print(
            f"FID of {args.num_images} images ({config.num_classes} classes, balanced) from {args.model}: "
            f"{settings.resolved(config).describe()}, seed {args.seed}"
        )
        try:
            metrics, outputs = evaluate_fid(
                source.path, reference, inception_path, num_images=args.num_images, settings=settings,
                batch_size=args.batch_size, seed=args.seed, num_classes=config.num_classes,
                num_workers=_default_workers(args), gpus_per_worker=args.gpus_per_worker, device=args.device,
                keep_images=bool(args.save_npz), precision_recall_images=args.pr_images, progress=not args.quiet,
            )  # fmt: skip
        except ValueError as err:
            raise CLIError(str(err)) from None
        values = metrics.as_dict()
        _print_metrics(f"against {args.reference}:", values)
        if args.save_npz:
            np.savez(args.save_npz, arr_0=outputs["images"])
            print(f"wrote {args.save_npz} (arr_0: {outputs['images'].shape} uint8, ADM evaluator layout)")
        payload = {"model": args.model, "reference": args.reference, "seed": args.seed,
                   "settings": settings.resolved(config).to_tags(), **values}  # fmt: skip
        _write_json(args.out, payload)
        if args.record:
            _record(source, {k: v for k, v in values.items() if k != "num_images"}, prefix="",
                    settings=settings.resolved(config))  # fmt: skip
    return 0


# ------------------------------------------------------------------------------------------ parser
def add_commands(subparsers: argparse._SubParsersAction) -> None:
    from fractalgen.cli.sample import add_sampling_args  # deferred: heavy import
    from fractalgen.config import finite_float  # deferred: heavy import

    p = subparsers.add_parser(
        "eval", help="evaluate a model: bits/dim, FID/IS/precision/recall, reference stats"
    )
    sub = p.add_subparsers(dest="eval_command", metavar="{nll,fid,stats}", required=True)
    model_help = "models:/NAME@ALIAS, models:/NAME/VERSION, a released-format .pth or a checkpoint folder"
    inc_help = ("FID Inception weights (pt_inception-2015-12-05-6726825d.pth or torch-fidelity's file): a path or "
                "s3:// / https:// URI; default: $FRACTALGEN_INCEPTION_WEIGHTS, then ~/.cache/fractalgen/")  # fmt: skip

    n = sub.add_parser("nll", help="unconditional bits/dim on a shard set",
                       description="Bits/dim averaged over --num-passes forward passes per batch (default: 10 for "
                                   "MAR models, 1 for AR models, as the released evaluation).")  # fmt: skip
    n.add_argument("--model", required=True, help=model_help)
    n.add_argument("--data", required=True, help="prepared shard set (folder or s3://)")
    n.add_argument("--batch-size", type=int, default=64)
    n.add_argument("--num-passes", type=int, help="forward passes per batch (default 10 MAR / 1 AR)")
    n.add_argument("--max-images", type=int, help="evaluate at most this many images")
    n.add_argument("--out", help="write the result as JSON")
    n.add_argument("--record", action="store_true", help="store the result on the registered version")
    n.add_argument("--device")
    n.add_argument("--s3-endpoint-url")
    n.add_argument("-q", "--quiet", action="store_true")
    n.set_defaults(func=run_nll)

    f = sub.add_parser(
        "fid",
        help="generate N images with balanced classes and compute FID, IS, precision and recall",
        description="Generate --num-images images (class j mod num_classes, batch i with seed SEED+i), spread "
                    "over Ray workers (one GPU each) with --workers, and score them against REFERENCE: an .npz "
                    "with mu/sigma (ADM reference batch, or `fractalgen eval stats`) or a shard set.",
    )  # fmt: skip
    f.add_argument("--model", required=True, help=model_help)
    f.add_argument(
        "--reference", required=True, help="reference .npz (mu, sigma[, features | arr_0]) or a shard set URI"
    )
    f.add_argument("--reference-images", type=int, help="with a shard set: use at most this many images")
    f.add_argument("--inception", help=inc_help)
    f.add_argument(
        "--num-images", type=int, default=50_000, help="images to generate (default 50000: FID-50K)"
    )
    f.add_argument("--batch-size", type=int, default=64)
    f.add_argument("--seed", type=int, default=0)
    f.add_argument(
        "--workers",
        type=int,
        help="Ray workers (0: this process; -1: one per GPU of the Ray cluster; default: -1 with RAY_ADDRESS or > 1 GPU, else 0)",
    )
    f.add_argument(
        "--gpus-per-worker", type=finite_float, default=1.0, help="GPUs per Ray worker (default 1)"
    )
    f.add_argument(
        "--pr-images", type=int, default=10_000, help="images per side for precision/recall (0: skip)"
    )
    f.add_argument("--save-npz", help="also save the samples as an .npz (arr_0, N x H x W x 3 uint8)")
    f.add_argument("--out", help="write the metrics as JSON")
    f.add_argument("--record", action="store_true", help="store the metrics on the registered version")
    f.add_argument("--device")
    f.add_argument("-q", "--quiet", action="store_true")
    add_sampling_args(f)
    f.set_defaults(func=run_fid)

    s = sub.add_parser("stats", help="reference statistics (mu, sigma, features) of a shard set as an .npz")
    s.add_argument(
        "--data", required=True, help="prepared shard set (folder or s3://), e.g. the validation set"
    )
    s.add_argument("--out", required=True, help="output .npz")
    s.add_argument("--inception", help=inc_help)
    s.add_argument("--max-images", type=int, help="use at most this many images")
    s.add_argument(
        "--keep-features", type=int, default=10_000, help="feature vectors kept for precision/recall"
    )
    s.add_argument("--batch-size", type=int, default=64)
    s.add_argument("--device")
    s.add_argument("--s3-endpoint-url")
    s.add_argument("-q", "--quiet", action="store_true")
    s.set_defaults(func=run_stats)
