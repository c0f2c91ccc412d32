"""Preparation: folder, tar and Parquet sources -> shards equal to an independent crop; skip; resume."""

from __future__ import annotations

import io
import json
import os
import signal
import tarfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pipelines_helpers import (
    WNIDS,
    check_dataset,
    jpeg_bytes,
    make_folder_source,
    make_images,
    make_train_tar,
    random_photo,
    read_dataset,
    run_python,
)

from fractalgen.pipelines import DataError
from fractalgen.pipelines.prepare import prepare_dataset
from fractalgen.pipelines.summary import read_summary


def test_imagenet_folder_with_corrupt_files(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    expected = make_folder_source(tmp_path / "imagenet", rng, per_class=4)
    train = tmp_path / "imagenet" / "train"
    good = jpeg_bytes(random_photo(rng, 50, 40))
    (train / WNIDS[0] / "garbage.JPEG").write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG")
    (train / WNIDS[1] / "truncated.JPEG").write_bytes(good[: len(good) // 2])
    (train / "README.txt").write_text("not an image, ignored")

    out = tmp_path / "in16"
    summary = prepare_dataset(
        str(tmp_path / "imagenet"),
        str(out),
        size=16,
        workers=2,
        part_size=5,
        compression="zstd",
        progress=False,
    )
    check_dataset(str(out), expected["train"], list(WNIDS), 16)
    assert summary["num_images"] == 12 and summary["num_classes"] == 3
    assert summary["class_names"] == list(WNIDS) and summary["class_counts"] == [4, 4, 4]
    assert summary["image_size"] == 16 and summary["split"] == "train"
    assert summary["num_parts"] == 3 and summary["bytes"] > 0 and summary["compression"] == "zstd"
    skipped = {s["key"]: s["reason"] for s in summary["skipped"]}
    assert set(skipped) == {f"{WNIDS[0]}/garbage.JPEG", f"{WNIDS[1]}/truncated.JPEG"}
    assert all(r.startswith("corrupt or unreadable image") for r in skipped.values())
    assert "truncated" in skipped[f"{WNIDS[1]}/truncated.JPEG"]
    assert summary["num_skipped"] == 2 and summary["skipped_reasons"] == {"corrupt or unreadable image": 2}
    # the same summary on disk, in JSON and Parquet
    assert read_summary(str(out))["num_images"] == 12
    classes = pq.read_table(out / "summary.parquet").to_pydict()
    assert classes == {"class_index": [0, 1, 2], "class_name": list(WNIDS), "num_images": [4, 4, 4]}
    assert (
        json.loads(pq.read_schema(out / "summary.parquet").metadata[b"fractalgen_summary"])["num_images"]
        == 12
    )
    assert sorted(pq.read_table(out / "skipped.parquet").column("key").to_pylist()) == sorted(skipped)

    # val: flat images + LOC_val_solution.csv found one level up, class order taken from train
    val_out = tmp_path / "in16-val"
    prepare_dataset(
        str(tmp_path / "imagenet"),
        str(val_out),
        size=16,
        split="val",
        class_names=list(WNIDS),
        progress=False,
    )
    check_dataset(str(val_out), expected["val"], list(WNIDS), 16)


def test_train_tar_and_folder_tar(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    expected = make_train_tar(tmp_path / "ILSVRC2012_img_train.tar", rng, per_class=3)
    out = tmp_path / "from-tar"
    summary = prepare_dataset(
        str(tmp_path / "ILSVRC2012_img_train.tar"), str(out), size=16, workers=2, part_size=4, progress=False
    )
    assert summary["source_kind"] == "tar" and summary["num_images"] == 9
    # the class tars are in reversed order inside the archive; labels still follow the sorted wnids
    with tarfile.open(tmp_path / "ILSVRC2012_img_train.tar") as tar:
        assert tar.getnames() == [f"{wnid}.tar" for wnid in reversed(WNIDS)]
    assert summary["class_names"] == list(WNIDS) and summary["class_counts"] == [3, 3, 3]
    check_dataset(str(out), expected, list(WNIDS), 16)

    # a tar of the folder layout, choosing the split, with one class the val split lacks
    folder_expected = {}
    with tarfile.open(tmp_path / "folders.tar", "w") as tar:
        for split, wnids in (("train", WNIDS[:2]), ("val", WNIDS)):
            for wnid in wnids:
                for i, data in enumerate(make_images(rng, 2)):
                    info = tarfile.TarInfo(f"{split}/{wnid}/{wnid}_{i}.JPEG")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                    if split == "train":
                        folder_expected[f"{wnid}/{wnid}_{i}.JPEG"] = (data, wnid)
    summary = prepare_dataset(
        str(tmp_path / "folders.tar"),
        str(tmp_path / "from-folder-tar"),
        size=8,
        split="train",
        progress=False,
    )
    assert summary["class_names"] == list(WNIDS[:2])
    check_dataset(str(tmp_path / "from-folder-tar"), folder_expected, list(WNIDS[:2]), 8)


def test_flat_val_tar_with_labels_file_beside_it(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    folder = tmp_path / "imagenet"
    folder.mkdir()
    expected: dict[str, tuple[bytes, str]] = {}
    rows = ["ImageId,PredictionString"]
    with tarfile.open(folder / "ILSVRC2012_img_val.tar", "w") as tar:
        for i, data in enumerate(make_images(rng, 7)):
            name = f"ILSVRC2012_val_{i + 1:08d}"
            info = tarfile.TarInfo(f"{name}.JPEG")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
            if i == 6:
                continue  # not in the labels file: skipped
            wnid = WNIDS[2 - i % 3]  # classes first seen in reversed order
            rows.append(f"{name},{wnid} 1 2 30 40 {WNIDS[0]} 3 4 20 20")
            expected[f"{name}.JPEG"] = (data, wnid)
    (folder / "LOC_val_solution.csv").write_text("\n".join(rows) + "\n")

    out = tmp_path / "val16"
    summary = prepare_dataset(
        str(folder / "ILSVRC2012_img_val.tar"), str(out), size=16, part_size=4, progress=False
    )
    assert summary["source_kind"] == "tar" and summary["class_names"] == list(WNIDS)
    assert summary["num_images"] == 6 and summary["class_counts"] == [2, 2, 2]
    assert [s["key"] for s in summary["skipped"]] == ["ILSVRC2012_val_00000007.JPEG"]
    assert summary["skipped"][0]["reason"].startswith("no label")
    check_dataset(str(out), expected, list(WNIDS), 16)


def test_shard_size_limit_splits_parts_into_several_shards(tmp_path: Path) -> None:
    rng = np.random.default_rng(6)
    expected = make_folder_source(tmp_path / "src", rng, per_class=4, val=1)["train"]
    out = tmp_path / "small-shards"
    summary = prepare_dataset(
        str(tmp_path / "src"), str(out), size=16, part_size=6, shard_size_limit="2kb", progress=False
    )
    assert summary["shard_size_limit"] == 2048 and summary["num_parts"] == 2
    markers = [json.loads((out / f"part-{i:05d}" / "part.json").read_text()) for i in range(2)]
    assert all(m["num_shards"] > 1 for m in markers), markers
    assert summary["num_shards"] == sum(m["num_shards"] for m in markers)
    index = json.loads((out / "index.json").read_text())
    assert len(index["shards"]) == summary["num_shards"]
    for shard in index["shards"]:  # a shard holds more than one sample only while under the limit
        assert shard["raw_data"]["bytes"] <= 2048 or shard["samples"] == 1, shard
    check_dataset(str(out), expected, list(WNIDS), 16)


def _hub_table(images: list[bytes], labels: list[int], names: list[str]) -> pa.Table:
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table(
        {
            "image": pa.array(
                [{"bytes": b, "path": f"img{i}.JPEG"} for i, b in enumerate(images)], image_type
            ),
            "label": pa.array(labels, pa.int64()),
        }
    )
    hub = {
        "info": {"features": {"image": {"_type": "Image"}, "label": {"names": names, "_type": "ClassLabel"}}}
    }
    return table.replace_schema_metadata({"huggingface": json.dumps(hub)})


def test_parquet_hub_layout_and_string_labels(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    names = ["tench", "goldfish", "white shark"]
    folder = tmp_path / "hub" / "data"
    folder.mkdir(parents=True)
    expected: dict[str, tuple[bytes, str]] = {}
    for f in range(2):
        images = make_images(rng, 7)
        labels = [int(x) for x in rng.integers(0, 3, 7)]
        images[3] = b"\x89PNG broken"  # a corrupt row
        name = f"train-{f:05d}-of-00002.parquet"
        pq.write_table(_hub_table(images, labels, names), folder / name, row_group_size=3)
        for row, (data, label) in enumerate(zip(images, labels)):
            if row != 3:
                expected[f"data/{name}#{row}"] = (data, names[label])
    pq.write_table(
        _hub_table(make_images(rng, 2), [0, 1], names), folder / "validation-00000-of-00001.parquet"
    )

    out = tmp_path / "from-parquet"
    # parts of 4 rows cross row groups (3 rows) and files (7 rows)
    summary = prepare_dataset(
        str(tmp_path / "hub"), str(out), size=16, split="train", workers=2, part_size=4, progress=False
    )
    assert summary["source_kind"] == "parquet" and summary["class_names"] == names
    assert summary["num_images"] == 12 and summary["num_skipped"] == 2
    check_dataset(str(out), expected, names, 16)

    # plain binary column + string labels: classes are the sorted distinct names
    images = make_images(rng, 5)
    labels = ["zebra", "ant", "zebra", "moth", "ant"]
    pq.write_table(
        pa.table({"jpg": pa.array(images, pa.binary()), "cls": labels}), tmp_path / "plain.parquet"
    )
    summary = prepare_dataset(
        str(tmp_path / "plain.parquet"), str(tmp_path / "plain"), size=8, label_column="cls", progress=False
    )
    assert summary["class_names"] == ["ant", "moth", "zebra"]
    check_dataset(
        str(tmp_path / "plain"),
        {f"plain.parquet#{i}": (d, c) for i, (d, c) in enumerate(zip(images, labels))},
        ["ant", "moth", "zebra"],
        8,
    )


def test_refuses_foreign_or_changed_output(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    make_folder_source(tmp_path / "src", rng, per_class=2, val=1)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "precious.txt").write_text("keep me")
    with pytest.raises(DataError, match="not empty"):
        prepare_dataset(str(tmp_path / "src"), str(tmp_path / "busy"), size=8, progress=False)
    assert (tmp_path / "busy" / "precious.txt").exists()
    out = str(tmp_path / "out")
    first = prepare_dataset(str(tmp_path / "src"), out, size=8, progress=False)
    again = prepare_dataset(str(tmp_path / "src"), out, size=8, progress=False)  # complete: nothing to do
    assert again["num_images"] == first["num_images"] == 6
    with pytest.raises(DataError, match="image_size"):
        prepare_dataset(str(tmp_path / "src"), out, size=16, progress=False)
    assert (
        prepare_dataset(str(tmp_path / "src"), out, size=16, overwrite=True, progress=False)["image_size"]
        == 16
    )
    with pytest.raises(DataError, match="does not exist"):
        prepare_dataset(str(tmp_path / "nowhere"), str(tmp_path / "o2"), size=8, progress=False)


_SLOW_PREPARE = """
import sys, time
import fractalgen.pipelines.crop as crop
original = crop.decode_and_crop
def slow(data, size):
    time.sleep(0.03)
    return original(data, size)
crop.decode_and_crop = slow
from fractalgen.pipelines.prepare import prepare_dataset
prepare_dataset(sys.argv[1], sys.argv[2], size=16, workers=2, part_size=4, progress=False)
"""


def test_killed_conversion_resumes_to_the_same_images(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    make_folder_source(tmp_path / "src", rng, per_class=12, val=1)
    (tmp_path / "src" / "train" / WNIDS[2] / "bad.JPEG").write_bytes(b"garbage")
    src, out, ref = str(tmp_path / "src"), tmp_path / "killed", str(tmp_path / "reference")

    # A real crash: SIGKILL the converter (and its workers) once two parts are published.
    proc = run_python(
        _SLOW_PREPARE.replace("sys.argv[1], sys.argv[2]", f"{src!r}, {str(out)!r}"), start_new_session=True
    )
    deadline = time.time() + 300  # generous: a loaded 2-core box
    try:
        while len(list(out.glob("part-*/part.json"))) < 2:
            assert proc.poll() is None, "the conversion ended before it could be interrupted"
            assert time.time() < deadline, "the conversion published fewer than 2 parts in 300 s"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    done = len(list(out.glob("part-*/part.json")))
    assert 2 <= done < 10 and not (out / "index.json").exists()

    resumed = prepare_dataset(src, str(out), size=16, workers=2, part_size=4, progress=False)
    reference = prepare_dataset(src, ref, size=16, workers=1, part_size=4, progress=False)
    got, want = read_dataset(str(out)), read_dataset(ref)
    assert sorted(got) == sorted(want) and len(got) == 36
    for key in want:
        assert got[key][0] == want[key][0]
        np.testing.assert_array_equal(got[key][1], want[key][1])
    for field in ("num_images", "class_counts", "num_skipped", "skipped", "num_parts"):
        assert resumed[field] == reference[field], field
    assert not (out / "_prepare" / "staging").exists()
