"""``fractalgen data prepare|inspect|embedded`` through the real entry point."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pipelines_helpers import WNIDS, check_dataset, make_folder_source

from fractalgen.cli import main


def test_prepare_and_inspect(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    expected = make_folder_source(tmp_path / "imagenet", np.random.default_rng(40), per_class=3, val=1)
    out = tmp_path / "in16"
    code = main(
        [
            "data",
            "prepare",
            "--source",
            str(tmp_path / "imagenet"),
            "--out",
            str(out),
            "--size",
            "16",
            "--workers",
            "2",
            "--compression",
            "zstd",
            "--part-size",
            "4",
            "--no-progress",
        ]
    )
    assert code == 0
    assert "9 images, 3 classes" in capsys.readouterr().out
    check_dataset(str(out), expected["train"], list(WNIDS), 16)

    sheet = tmp_path / "sheet.png"
    assert main(["data", "inspect", str(out), "--sheet", str(sheet), "--samples", "6"]) == 0
    text = capsys.readouterr().out
    assert "9 in 3 shards" in text and WNIDS[2] in text and str(sheet) in text
    with Image.open(sheet) as image:
        assert image.width >= 6 * 64 and image.height >= 64  # 16 px tiles drawn at 64 px

    assert main(["data", "inspect", str(out), "--no-sheet", "--json"]) == 0
    assert '"num_images": 9' in capsys.readouterr().out


def test_user_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code = main(
        [
            "data",
            "prepare",
            "--source",
            str(tmp_path / "missing"),
            "--out",
            str(tmp_path / "o"),
            "--size",
            "16",
            "--no-progress",
        ]
    )
    assert code == 2 and "does not exist" in capsys.readouterr().err
    assert main(["data", "inspect", str(tmp_path / "nothing"), "--no-sheet"]) == 2
    assert "no MDS dataset" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["data", "prepare", "--help"])
    assert "--compression" in capsys.readouterr().out


def test_embedded_command(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "demo"
    assert (
        main(
            [
                "data",
                "embedded",
                "--out",
                str(out),
                "--size",
                "16",
                "--images-per-class",
                "2",
                "--no-progress",
            ]
        )
        == 0
    )
    assert "32 images, 16 classes, 16px" in capsys.readouterr().out
