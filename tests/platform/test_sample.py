"""``fractalgen sample``: PNGs and grid equal direct sampling, the generation GIF replays the real
generation order, inpainting keeps the given pixels, errors are clear."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fractalgen.cli import main
from fractalgen.models import build_model, load_released, save_released


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sample")
    torch.manual_seed(0)
    return {
        "mar": save_released(build_model("fractalmar_tiny16"), root / "mar.pth"),
        "ar": save_released(build_model("fractalar_tiny16"), root / "ar.pth"),
        "mar32": save_released(build_model("fractalmar_tiny32"), root / "mar32.pth"),
    }


def read_pngs(folder: Path, labels: list[int]) -> np.ndarray:
    return np.stack(
        [np.asarray(Image.open(folder / f"{i:05d}_class{lab}.png")) for i, lab in enumerate(labels)]
    )


def as_uint8(images: torch.Tensor) -> np.ndarray:
    return (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def test_pngs_and_grid_equal_direct_sampling(ckpts: dict[str, Path], tmp_path: Path) -> None:
    labels = [1, 5, 5, 9]
    assert main(["sample", "--model", str(ckpts["mar"]), "--out", str(tmp_path), "--labels", "1,5,5,9",
                 "--seed", "7", "--batch-size", "2", "--num-iters", "2,2", "--cfg", "1.5", "-q"]) == 0  # fmt: skip
    model = load_released(ckpts["mar"])
    kw = {"num_iters": (2, 2), "cfg": 1.5}
    expected = torch.cat([model.sample(torch.tensor([1, 5]), seed=7, **kw),  # batch i: seed + i
                          model.sample(torch.tensor([5, 9]), seed=8, **kw)])  # fmt: skip
    np.testing.assert_array_equal(read_pngs(tmp_path, labels), as_uint8(expected))
    grid = Image.open(tmp_path / "grid.png")
    assert grid.size == ((2 * 16 + 3) * 8, (2 * 16 + 3) * 8)  # 2x2 images, 1 px padding, upscaled x8
    record = json.loads((tmp_path / "sample.json").read_text())
    assert (
        record["labels"] == labels
        and record["settings"]["num_iters"] == "2,2"
        and record["settings"]["cfg"] == "1.5"
    )


def test_schedule_flags_reach_the_model_and_sample_json(ckpts: dict[str, Path], tmp_path: Path) -> None:
    flags = ["--cfg", "3", "--cfg-schedule", "interval:start=0.25,end=0.75", "--lower-cfg", "1.5",
             "--lower-cfg-schedule", "cosine", "--temperature-end", "0.9", "--filter-threshold", "0.001"]  # fmt: skip
    assert main(["sample", "--model", str(ckpts["mar32"]), "--out", str(tmp_path), "--labels", "2,3",
                 "--seed", "1", "--num-iters", "4,2,2", "-q", *flags]) == 0  # fmt: skip
    model = load_released(ckpts["mar32"])
    expected = model.sample(
        torch.tensor([2, 3]), seed=1, num_iters=(4, 2, 2), cfg=3.0, cfg_schedule="interval:start=0.25,end=0.75",
        lower_cfg=1.5, lower_cfg_schedule="cosine", temperature_end=0.9, filter_threshold=1e-3,
    )  # fmt: skip
    np.testing.assert_array_equal(read_pngs(tmp_path, [2, 3]), as_uint8(expected))
    settings = json.loads((tmp_path / "sample.json").read_text())["settings"]
    assert (
        settings["cfg_schedule"] == "interval:start=0.25,end=0.75"
        and settings["lower_cfg_schedule"] == "cosine"
    )
    assert (settings["lower_cfg"], settings["temperature_end"]) == ("1.5", "0.9")


@pytest.mark.parametrize("spec", ["cubic", "interval:start=0.5,end=0.5", "power-cosine:exponent=-1"])
def test_bad_schedule_flag_exits_2_naming_it(
    ckpts: dict[str, Path], tmp_path: Path, spec: str, capsys
) -> None:
    code = main(
        ["sample", "--model", str(ckpts["mar"]), "--out", str(tmp_path), "--cfg-schedule", spec, "-q"]
    )
    assert code == 2 and "cfg_schedule" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["mar", "ar", "mar32"])
def test_animation_replays_the_generation_order(ckpts: dict[str, Path], kind: str) -> None:
    from fractalgen.cli.sample import BACKGROUND, GenerationRecorder

    model = load_released(ckpts[kind])
    iters = {"mar": (2, 2), "ar": None, "mar32": (2, 2, 2)}[kind]
    with GenerationRecorder(model) as rec:
        images = model.sample(torch.tensor([0, 1]), seed=3, num_iters=iters)
    assert "sample" not in model.generator.__dict__  # the instance is restored
    frames = rec.frames(images, max_frames=1000, hold=0)
    grey = [int((f == BACKGROUND).all(dim=1).sum()) for f in frames]
    assert grey[0] == 2 * model.config.img_size**2 and grey[-1] == 0
    assert all(a >= b for a, b in itertools.pairwise(grey))  # pixels only ever get fixed
    assert len(frames) > 4 and len(set(grey)) > 3  # several intermediate states
    # the replayed canvas before the final frame is the final image (up to the 1/255 rounding)
    assert torch.allclose(frames[-2], images, atol=0.6 / 255)
    # the same seed gives the same images with and without recording
    torch.testing.assert_close(model.sample(torch.tensor([0, 1]), seed=3, num_iters=iters), images)


def test_animate_and_inpaint_cli(ckpts: dict[str, Path], tmp_path: Path) -> None:
    source = np.random.default_rng(0).integers(0, 256, size=(16, 16, 3), dtype=np.uint8)
    Image.fromarray(source).save(tmp_path / "input.png")
    out = tmp_path / "out"
    code = main(["sample", "--model", str(ckpts["mar"]), "--out", str(out), "--labels", "2,3", "--num-iters", "2,2",
                 "--input", str(tmp_path / "input.png"), "--region", "center", "--animate", "-q"])  # fmt: skip
    assert code == 0
    gif = Image.open(out / "generation.gif")
    assert gif.is_animated and gif.n_frames > 2
    images = read_pngs(out, [2, 3])
    keep = np.ones((16, 16), bool)
    keep[4:12, 4:12] = False
    assert (images[:, keep] == source[keep]).all()  # the given pixels come back unchanged
    assert (images[0][~keep] != source[~keep]).any()
    assert np.asarray(Image.open(out / "mask.png").convert("L"))[8, 8] == 255  # white = generated


def test_clear_errors(ckpts: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sample", "--model", str(ckpts["mar"]), "--out", str(tmp_path), "--labels", "12"]) == 2
    assert "class 12 is out of range: the model has 10 classes" in capsys.readouterr().err
    assert main(["sample", "--model", str(tmp_path / "missing.pth"), "--out", str(tmp_path)]) == 2
    assert "neither a registered model" in capsys.readouterr().err
    assert main(["sample", "--model", str(ckpts["mar"]), "--out", str(tmp_path), "--region", "center"]) == 2
    assert "need --input" in capsys.readouterr().err
