"""End to end: reference statistics from shards, FID/IS/precision/recall of generated images with an
Inception network whose weights file the test writes, bits/dim, Ray-distributed generation."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from fractalgen.cli import main
from fractalgen.models import build_model, save_released


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny16 checkpoint and a 16x16 embedded shard set (4 classes x 4 images)."""
    from fractalgen.pipelines.embedded import build_embedded_dataset

    root = tmp_path_factory.mktemp("eval")
    torch.manual_seed(0)
    ckpt = save_released(build_model("fractalmar_tiny16", num_classes=4), root / "tiny.pth")
    data = root / "data"
    build_embedded_dataset(str(data), size=16, images_per_class=4, num_classes=4)
    return {"ckpt": ckpt, "data": data, "root": root}


def test_inception_weights_load_strictly(inception_weights: Path, tmp_path: Path) -> None:
    from fractalgen.platform.evaluation.inception import InceptionWeightsError, load_inception

    state = torch.load(inception_weights, weights_only=True)
    # converted files (pytorch-fid, torch-fidelity) carry no BatchNorm batch counters
    stripped = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    torch.save(stripped, tmp_path / "stripped.pth")
    net = load_inception(tmp_path / "stripped.pth")
    pool, logits = net(torch.rand(1, 3, 16, 16))
    assert pool.shape == (1, 2048) and logits.shape == (1, 1008) and torch.isfinite(pool).all()
    del stripped["fc.weight"]
    torch.save(stripped, tmp_path / "broken.pth")
    with pytest.raises(InceptionWeightsError, match=r"missing \['fc.weight'\]"):
        load_inception(tmp_path / "broken.pth")


@pytest.mark.slow
def test_fid_pipeline_end_to_end(tiny: dict[str, Path], inception_weights: Path, tmp_path: Path) -> None:
    ref = tmp_path / "ref.npz"
    assert main(["eval", "stats", "--data", str(tiny["data"]), "--out", str(ref), "--inception",
                 str(inception_weights), "--max-images", "8", "--batch-size", "8", "-q"]) == 0  # fmt: skip
    with np.load(ref) as f:
        assert f["mu"].shape == (2048,) and f["sigma"].shape == (2048, 2048) and int(f["num_images"]) == 8
        assert f["features"].shape == (8, 2048)

    out = tmp_path / "metrics.json"
    samples = tmp_path / "samples.npz"
    code = main(["eval", "fid", "--model", str(tiny["ckpt"]), "--reference", str(ref), "--inception",
                 str(inception_weights), "--num-images", "8", "--batch-size", "4", "--num-iters", "2,2",
                 "--workers", "0", "--pr-images", "8", "--out", str(out), "--save-npz", str(samples), "-q"])  # fmt: skip
    assert code == 0
    m = json.loads(out.read_text())
    assert m["num_images"] == 8 and math.isfinite(m["fid"]) and m["fid"] > 0
    assert m["inception_score"] >= 1.0 - 1e-9 and 0.0 <= m["precision"] <= 1.0 and 0.0 <= m["recall"] <= 1.0
    assert m["settings"]["sampling.num_iters"] == "2,2"
    with np.load(samples) as f:
        assert f["arr_0"].shape == (8, 16, 16, 3) and f["arr_0"].dtype == np.uint8

    # the same numbers from the saved samples: generation -> features -> FID is one consistent path
    from fractalgen.platform.evaluation.inception import extract_features, load_inception
    from fractalgen.platform.evaluation.metrics import fid_from_features, load_statistics

    with np.load(samples) as f:
        feats, _ = extract_features(load_inception(inception_weights), f["arr_0"])
    assert fid_from_features(feats, load_statistics(ref)) == pytest.approx(m["fid"], rel=1e-4)


def test_missing_weights_is_a_clear_cli_error(tiny: dict[str, Path], tmp_path: Path, capsys) -> None:
    code = main(["eval", "stats", "--data", str(tiny["data"]), "--out", str(tmp_path / "r.npz"),
                 "--inception", str(tmp_path / "nowhere" / "pt_inception-2015-12-05-6726825d.pth")])  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err
    assert "put it at" in err and "nowhere" in err and "pt_inception-2015-12-05-6726825d.pth" in err


def test_nll_bits_per_dim(tiny: dict[str, Path], tmp_path: Path) -> None:
    from fractalgen.models import load_released
    from fractalgen.platform.evaluation.data import evaluate_nll

    out = tmp_path / "nll.json"
    code = main(["eval", "nll", "--model", str(tiny["ckpt"]), "--data", str(tiny["data"]), "--batch-size", "4",
                 "--max-images", "8", "--num-passes", "2", "--out", str(out), "-q"])  # fmt: skip
    assert code == 0
    m = json.loads(out.read_text())
    assert m["num_images"] == 8 and m["num_passes"] == 2
    assert 6.0 < m["nll_bpd"] < 10.0  # an untrained model is close to uniform: 8 bits per sub-pixel
    again = evaluate_nll(load_released(tiny["ckpt"]), str(tiny["data"]), batch_size=4, max_images=8,
                         num_passes=2, progress=False)  # fmt: skip
    assert again["nll_bpd"] == pytest.approx(m["nll_bpd"], rel=1e-6)  # the masks are seeded


@pytest.mark.slow
def test_ray_workers_give_the_same_features_as_one_process(
    tiny: dict[str, Path], inception_weights: Path
) -> None:
    import ray

    from fractalgen.platform.generation.sampling import GenerationJob, balanced_labels, generate_features
    from fractalgen.sampling_settings import SamplingSettings

    job = GenerationJob(
        labels=balanced_labels(4, 4), settings=SamplingSettings(num_iters=(2, 2)), batch_size=2, seed=3
    )
    local = generate_features(tiny["ckpt"], inception_weights, job, num_workers=0, progress=False)
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        spread = generate_features(tiny["ckpt"], inception_weights, job, num_workers=2, progress=False)
    finally:
        if started:
            ray.shutdown()
    # same images; the features differ only by float summation order (thread counts differ)
    np.testing.assert_allclose(spread["features"], local["features"], rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(spread["logits"], local["logits"], rtol=1e-4, atol=1e-3)
