"""Bad input to ``data prepare`` / ``data inspect``: odd file names and pixel modes, sources where
nothing converts, a killed run's workers, and errors that name what to do."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from PIL import Image
from pipelines_helpers import (
    WNIDS,
    check_dataset,
    jpeg_bytes,
    make_folder_source,
    png16_bytes,
    random_photo,
    read_dataset,
    reference_crop,
    run_python,
)

from fractalgen.cli import main
from fractalgen.pipelines import DataError, crop, prepare
from fractalgen.pipelines.crop import decode_and_crop
from fractalgen.pipelines.prepare import prepare_dataset


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _tiff(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="TIFF")
    return buf.getvalue()


def _prepare_args(source: Path, out: Path, *extra: str) -> list[str]:
    return [
        "data",
        "prepare",
        "--source",
        str(source),
        "--out",
        str(out),
        "--size",
        "16",
        "--no-progress",
        *extra,
    ]


# ------------------------------------------------------------------------------ non-UTF-8 file names


def test_non_utf8_file_names_are_converted_and_listed(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rng = np.random.default_rng(10)
    expected = make_folder_source(tmp_path / "src", rng, per_class=2, val=1)["train"]
    train = os.fsencode(tmp_path / "src" / "train")
    good = jpeg_bytes(random_photo(rng, 40, 30))
    with open(train + b"/" + os.fsencode(WNIDS[0]) + b"/caf\xe9.JPEG", "wb") as f:  # Latin-1 name
        f.write(good)
    with open(train + b"/" + os.fsencode(WNIDS[1]) + b"/bad\xff.JPEG", "wb") as f:  # and corrupt
        f.write(b"not an image")
    os.mkdir(train + b"/n\xe9w")  # a class folder named in Latin-1
    other = jpeg_bytes(random_photo(rng, 30, 40))
    with open(train + b"/n\xe9w/x.JPEG", "wb") as f:
        f.write(other)

    out = tmp_path / "out"
    assert main(_prepare_args(tmp_path / "src", out, "--workers", "1")) == 0
    printed = capsys.readouterr().out
    assert "8 images, 4 classes" in printed and "3 renamed" in printed

    classes = [*WNIDS, "n\\xe9w"]  # sorted by the undecoded names, then escaped
    expected[f"{WNIDS[0]}/caf\\xe9.JPEG"] = (good, WNIDS[0])
    expected["n\\xe9w/x.JPEG"] = (other, "n\\xe9w")
    check_dataset(str(out), expected, classes, 16)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["class_names"] == classes
    assert [s["key"] for s in summary["skipped"]] == [f"{WNIDS[1]}/bad\\xff.JPEG"]
    assert {r["key"] for r in summary["renamed"]} == {
        f"{WNIDS[0]}/caf\\xe9.JPEG",
        f"{WNIDS[1]}/bad\\xff.JPEG",
        "n\\xe9w/x.JPEG",
    }
    assert summary["num_renamed"] == 3


# ------------------------------------------------------------------------------------- pixel modes


def _grey8(values16: np.ndarray) -> np.ndarray:
    """The expected 8-bit RGB of 16-bit grey values: the high byte (see fractalgen/pipelines/crop.py)."""
    return np.repeat((values16 >> 8).astype(np.uint8)[..., None], 3, axis=2)


def test_16_bit_images_are_scaled_not_clipped() -> None:
    rng = np.random.default_rng(11)
    grey = rng.integers(0, 1 << 16, (40, 56)).astype(np.uint16)
    want = reference_crop(_png(_grey8(grey)), 16)
    assert want.std() > 20  # a real picture, not flat white

    png16 = png16_bytes(grey)
    assert Image.open(io.BytesIO(png16)).mode == "I;16"
    np.testing.assert_array_equal(decode_and_crop(png16, 16), want)
    big_endian = Image.frombytes("I;16B", (56, 40), grey.astype(">u2").tobytes())
    np.testing.assert_array_equal(decode_and_crop(_tiff(big_endian), 16), want)
    as_int32 = Image.fromarray(grey.astype(np.int32), "I")
    np.testing.assert_array_equal(decode_and_crop(_tiff(as_int32), 16), want)
    # Pillow opens 16-bit RGB and grey+alpha PNGs as 8-bit by their high bytes: the same picture
    np.testing.assert_array_equal(decode_and_crop(png16_bytes(np.stack([grey] * 3, -1)), 16), want)
    alpha = rng.integers(0, 1 << 16, grey.shape).astype(np.uint16)
    np.testing.assert_array_equal(decode_and_crop(png16_bytes(np.stack([grey, alpha], -1)), 16), want)


def test_float_and_wide_integer_images() -> None:
    rng = np.random.default_rng(12)
    unit = rng.random((40, 56)).astype(np.float32)
    want = reference_crop(_png(np.repeat(np.rint(unit * 255).astype(np.uint8)[..., None], 3, 2)), 16)
    np.testing.assert_array_equal(decode_and_crop(_tiff(Image.fromarray(unit, "F")), 16), want)
    with pytest.raises(crop.UnsupportedImage, match=r"not in 0\.\.1"):
        decode_and_crop(_tiff(Image.fromarray(unit * 255, "F")), 16)
    wide = rng.integers(-5, 1 << 20, (40, 56)).astype(np.int32)
    with pytest.raises(crop.UnsupportedImage, match="outside the 16-bit range"):
        decode_and_crop(_tiff(Image.fromarray(wide, "I")), 16)


@pytest.mark.parametrize("mode", ["LA", "P-transparency", "1"])
def test_alpha_and_palette_modes_follow_the_released_loader(mode: str) -> None:
    # The released loader's convert("RGB"): alpha is dropped, palette colours are looked up.
    rgb = random_photo(np.random.default_rng(13), 50, 40)
    if mode == "P-transparency":
        image = Image.fromarray(rgb).convert("P")
        image.info["transparency"] = 0
    else:
        image = Image.fromarray(rgb).convert(mode)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    data = buf.getvalue()
    assert Image.open(io.BytesIO(data)).mode == mode.split("-")[0]
    np.testing.assert_array_equal(decode_and_crop(data, 16), reference_crop(data, 16))


# ------------------------------------------------------------------------------ nothing converts


def test_source_of_only_bad_files_is_an_error_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    src = tmp_path / "src"
    for i in range(12):
        (src / WNIDS[i % 3]).mkdir(parents=True, exist_ok=True)
        (src / WNIDS[i % 3] / f"broken_{i:02d}.JPEG").write_bytes(b"\xff\xd8 not a JPEG %d" % i)
    out = tmp_path / "out"
    out.mkdir()  # an empty folder made for it stays, empty
    assert main(_prepare_args(src, out, "--workers", "1", "--part-size", "5")) == 2
    err = capsys.readouterr().err
    assert (
        "no image" in err
        and str(src) in err
        and "all 12 items skipped: 12 corrupt or unreadable image" in err
    )
    assert f"{WNIDS[0]}/broken_00.JPEG: corrupt or unreadable image" in err
    assert "and 2 more" in err  # the first 10 named
    assert list(out.iterdir()) == []

    # --overwrite of a good dataset with that source: refused before anything is deleted
    make_folder_source(tmp_path / "good", np.random.default_rng(20), per_class=1, val=1)
    assert main(_prepare_args(tmp_path / "good", out, "--workers", "1")) == 0
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert main(_prepare_args(src, out, "--workers", "1", "--overwrite")) == 2
    err = capsys.readouterr().err
    assert "no image" in err and f"{out} was left as it was" in err and "broken_11.JPEG" not in err
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_bad_mixed_source_converts_the_rest(tmp_path: Path) -> None:
    rng = np.random.default_rng(14)
    expected = make_folder_source(tmp_path / "src", rng, per_class=1, val=1)["train"]
    train = tmp_path / "src" / "train"
    grey = rng.integers(0, 1 << 16, (30, 30)).astype(np.uint16)
    (train / WNIDS[0] / "deep.png").write_bytes(png16_bytes(grey))
    (train / WNIDS[1] / "hdr.tif").write_bytes(
        _tiff(Image.fromarray(np.full((20, 20), 7.5, np.float32), "F"))
    )
    summary = prepare_dataset(str(tmp_path / "src"), str(tmp_path / "out"), size=16, progress=False)
    got = read_dataset(str(tmp_path / "out"))
    np.testing.assert_array_equal(got[f"{WNIDS[0]}/deep.png"][1], reference_crop(_png(_grey8(grey)), 16))
    assert summary["skipped"] == [
        {
            "key": f"{WNIDS[1]}/hdr.tif",
            "reason": "unsupported image: 32-bit float pixels in 7.5..7.5, "
            "not in 0..1: no defined 8-bit scale",
        }
    ]
    assert summary["num_images"] == len(expected) + 1 and summary["num_renamed"] == 0


# ---------------------------------------------------------------------------- errors name the flag


def test_other_settings_and_failed_source_keep_the_dataset(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    make_folder_source(tmp_path / "src", np.random.default_rng(15), per_class=1, val=1)
    out = tmp_path / "out"
    assert main(_prepare_args(tmp_path / "src", out, "--workers", "1")) == 0
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    capsys.readouterr()
    args = _prepare_args(tmp_path / "src", out, "--workers", "1")
    args[args.index("--size") + 1] = "8"
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "other settings (image_size)" in err and "--overwrite" in err and "overwrite=" not in err
    # --overwrite with a source that cannot be read: the dataset is not deleted
    assert main(_prepare_args(tmp_path / "missing", out, "--overwrite")) == 2
    assert "does not exist" in capsys.readouterr().err
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before


# ----------------------------------------------------------------------------- inspect names them


def test_inspect_names_the_skipped_files(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    make_folder_source(tmp_path / "src", np.random.default_rng(16), per_class=1, val=1)
    for i in range(3):
        (tmp_path / "src" / "train" / WNIDS[i] / f"junk{i}.JPEG").write_bytes(b"junk")
    out = tmp_path / "out"
    prepare_dataset(str(tmp_path / "src"), str(out), size=16, progress=False)
    assert main(["data", "inspect", str(out), "--no-sheet", "--skipped", "2"]) == 0
    text = capsys.readouterr().out
    assert f"{WNIDS[0]}/junk0.JPEG: corrupt or unreadable image" in text
    assert f"{WNIDS[1]}/junk1.JPEG: corrupt or unreadable image" in text
    assert "junk2" not in text and "1 more" in text
    assert str(out / "skipped.parquet") in text
    assert main(["data", "inspect", str(out), "--no-sheet", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert [s["key"] for s in info["skipped"]] == [f"{WNIDS[i]}/junk{i}.JPEG" for i in range(3)]
    assert info["skipped_list"] == str(out / "skipped.parquet")


# ------------------------------------------------------------------------------ killed conversions


_SLOW_CLI = """
import sys, time
import fractalgen.pipelines.crop as crop
original = crop.decode_and_crop
def slow(data, size):
    time.sleep(0.2)
    return original(data, size)
crop.decode_and_crop = slow
from fractalgen.cli import main
sys.exit(main(ARGS))
"""


def _alive(process: psutil.Process) -> bool:
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_sigkilled_prepare_leaves_no_workers_and_reruns(tmp_path: Path) -> None:
    expected = make_folder_source(tmp_path / "src", np.random.default_rng(17), per_class=8, val=1)["train"]
    out = tmp_path / "out"
    args = _prepare_args(tmp_path / "src", out, "--workers", "2", "--part-size", "2")
    with open(tmp_path / "log.txt", "wb") as log:
        proc = run_python(
            _SLOW_CLI.replace("ARGS", repr(args)), start_new_session=True, stdout=log, stderr=log
        )
    workers: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 120  # generous: imports on a loaded 2-core box
        while not list(out.glob("part-*/part.json")):
            assert proc.poll() is None, (tmp_path / "log.txt").read_text()
            assert time.monotonic() < deadline, "no part published in 120 s"
            time.sleep(0.05)
        workers = psutil.Process(proc.pid).children(recursive=True)
        proc.send_signal(signal.SIGKILL)  # the parent only, not its process group
        proc.wait()
        assert len(workers) == 2 and not (out / "index.json").exists()
        assert len(list(out.glob("part-*/part.json"))) < 12  # killed mid-conversion

        deadline = time.monotonic() + 60
        while any(_alive(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [w.pid for w in workers if _alive(w)], "workers outlived their killed parent"
    finally:
        for worker in workers:  # do not leak them if the test failed
            if _alive(worker):
                worker.kill()

    assert main(args) == 0
    check_dataset(str(out), expected, list(WNIDS), 16)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_images"] == 24 and summary["num_parts"] == 12


def test_a_second_run_waits_for_the_first_then_refuses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_folder_source(tmp_path / "src", np.random.default_rng(18), per_class=1, val=1)
    out = tmp_path / "out"
    monkeypatch.setattr(prepare, "LOCK_WAIT_S", 0.5)
    # Another process holds the run lock of `out` (a live run, or the workers of a killed one).
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, sys, time; f = open(sys.argv[1], 'a+'); "
            "fcntl.flock(f, fcntl.LOCK_EX); f.write('pid 4242 on elsewhere'); f.flush(); print('held', flush=True); "
            "time.sleep(60)",
            prepare._lock_path(str(out), None),
        ],
        stdout=subprocess.PIPE,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"held\n"
        with pytest.raises(DataError, match=r"being written by another .*pid 4242 on elsewhere"):
            prepare_dataset(str(tmp_path / "src"), str(out), size=16, progress=False)
        assert not out.exists()
    finally:
        holder.kill()
        holder.wait()
    assert prepare_dataset(str(tmp_path / "src"), str(out), size=16, progress=False)["num_images"] == 3


def test_a_superseded_worker_does_not_publish(tmp_path: Path) -> None:
    from fractalgen.pipelines.sources import open_source

    make_folder_source(tmp_path / "src", np.random.default_rng(19), per_class=1, val=1)
    out = tmp_path / "out"
    (out / "_prepare").mkdir(parents=True)
    (out / "_prepare" / "run.json").write_text(json.dumps({"token": "new", "pid": 1, "host": "h"}))
    src = open_source(str(tmp_path / "src"))
    task = prepare.PartTask(
        0, src.part(0, 3), str(out), 16, "png", None, 1 << 20, str(out / "_prepare" / "st"), run_token="old"
    )
    with pytest.raises(DataError, match="taken over this output; part-00000 was not published"):
        prepare.convert_part(task, progress=lambda n: None)
    assert not (out / "part-00000").exists()
