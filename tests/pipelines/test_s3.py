"""Object storage through moto's S3 server: storage helpers, S3 sources and outputs, resume on S3."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pipelines_helpers import WNIDS, check_dataset, make_folder_source, make_images, make_train_tar

from fractalgen import storage
from fractalgen.pipelines import DataError
from fractalgen.pipelines.prepare import prepare_dataset

pytestmark = pytest.mark.s3


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path: Path) -> str:
    if request.param == "local":
        return str(tmp_path / "store")
    server = request.getfixturevalue("s3_server")
    return f"s3://{server.new_bucket()}/some/prefix"


def test_storage_helpers(root: str, tmp_path: Path) -> None:
    storage.write_bytes(storage.join(root, "a", "x.bin"), b"0123456789")
    storage.write_json(storage.join(root, "a", "b", "y.json"), {"k": [1, 2]})
    storage.write_bytes(storage.join(root, "c.txt"), b"c")
    assert storage.exists(storage.join(root, "a", "x.bin")) and not storage.exists(storage.join(root, "zz"))
    assert storage.read_bytes(storage.join(root, "a", "x.bin")) == b"0123456789"
    assert storage.read_range(storage.join(root, "a", "x.bin"), 3, 4) == b"3456"
    assert storage.size(storage.join(root, "a", "x.bin")) == 10
    assert storage.read_json(storage.join(root, "a", "b", "y.json")) == {"k": [1, 2]}
    assert storage.list_files(root) == ["a/b/y.json", "a/x.bin", "c.txt"]
    assert storage.list_files(root, recursive=False) == ["c.txt"]
    assert storage.list_dirs(root) == ["a"] and storage.is_dir(storage.join(root, "a"))
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(storage.join(root, "missing"))
    with storage.open_input(storage.join(root, "a", "x.bin")) as f:
        f.seek(7)
        assert f.read() == b"789"
        f.seek(-4, io.SEEK_END)
        assert f.read(2) == b"67"
    local = tmp_path / "up"
    (local / "d").mkdir(parents=True)
    (local / "d" / "data").write_bytes(b"d")
    (local / "index.json").write_text("{}")
    storage.upload_dir(str(local), storage.join(root, "up"), last=("index.json",))
    assert storage.list_files(storage.join(root, "up")) == ["d/data", "index.json"]
    storage.download_file(storage.join(root, "up", "d", "data"), str(tmp_path / "down"))
    assert (tmp_path / "down").read_bytes() == b"d"
    # pyarrow with the endpoint passed explicitly
    fs, path = storage.pyarrow_filesystem(storage.join(root, "t.parquet"))
    pq.write_table(pa.table({"v": [1, 2, 3]}), path, filesystem=fs)
    assert pq.read_table(path, filesystem=fs).column("v").to_pylist() == [1, 2, 3]
    storage.delete_tree(storage.join(root, "a"))
    assert storage.list_files(root) == ["c.txt", "t.parquet", "up/d/data", "up/index.json"]
    storage.delete_file(storage.join(root, "c.txt"))
    assert not storage.exists(storage.join(root, "c.txt"))


def test_ray_storage_and_endpoint_for(root: str) -> None:
    """What Ray Train / Tune get as storage, and the endpoint each URI is read with."""
    filesystem, path = storage.ray_storage(storage.join(root, "runs"))
    if not storage.is_remote(root):
        assert filesystem is None and path == str(Path(root, "runs").absolute())
        assert storage.endpoint_for(root, "http://127.0.0.1:1") is None
        return
    bucket, prefix = storage.split_s3(root)
    assert path == f"{bucket}/{prefix}/runs"
    assert storage.endpoint_for(root) == storage.endpoint_url() is not None  # the fixture's moto endpoint
    assert storage.endpoint_for(root, "http://127.0.0.1:1") == "http://127.0.0.1:1"
    with filesystem.open_output_stream(f"{path}/x.txt") as f:  # reaches moto: the endpoint was passed
        f.write(b"ray")
    assert storage.read_bytes(storage.join(root, "runs", "x.txt")) == b"ray"


def test_s3_sources_to_s3_dataset_and_resume(s3_server, tmp_path: Path) -> None:
    rng = np.random.default_rng(30)
    bucket = f"s3://{s3_server.new_bucket()}"
    expected = make_folder_source(tmp_path / "imagenet", rng, per_class=4, val=2)
    storage.upload_dir(str(tmp_path / "imagenet"), f"{bucket}/imagenet")
    out = f"{bucket}/shards/in16"
    prepare_dataset(f"{bucket}/imagenet", out, size=16, workers=2, part_size=5, progress=False)
    check_dataset(out, expected["train"], list(WNIDS), 16)
    # val with its labels file, read from S3 too
    prepare_dataset(
        f"{bucket}/imagenet",
        f"{bucket}/shards/val16",
        size=16,
        split="val",
        class_names=list(WNIDS),
        progress=False,
    )
    check_dataset(f"{bucket}/shards/val16", expected["val"], list(WNIDS), 16)

    # an interruption on S3: index unpublished, one part without its marker, one with stray files only
    storage.delete_file(f"{out}/index.json")
    storage.delete_file(f"{out}/part-00001/part.json")
    storage.delete_tree(f"{out}/part-00002")
    storage.write_bytes(f"{out}/part-00002/shard.00000.mds", b"half a shard")
    with pytest.raises(DataError, match="resume"):
        from fractalgen.pipelines.loader import build_loader

        build_loader(out, micro_batch=2, rank=0, world_size=1)
    prepare_dataset(f"{bucket}/imagenet", out, size=16, workers=1, part_size=5, progress=False)
    check_dataset(out, expected["train"], list(WNIDS), 16)
    assert storage.read_bytes(f"{out}/part-00002/shard.00000.mds") != b"half a shard"
    assert storage.exists(f"{out}/part-00001/part.json")

    # tar and Parquet sources on S3
    tar_expected = make_train_tar(tmp_path / "train.tar", rng, per_class=2)
    storage.upload_file(str(tmp_path / "train.tar"), f"{bucket}/raw/train.tar")
    prepare_dataset(f"{bucket}/raw/train.tar", f"{bucket}/shards/tar16", size=16, part_size=4, progress=False)
    check_dataset(f"{bucket}/shards/tar16", tar_expected, list(WNIDS), 16)

    images = make_images(rng, 4)
    buf = io.BytesIO()
    pq.write_table(
        pa.table({"image": pa.array(images, pa.binary()), "label": [2, 0, 1, 2]}), buf, row_group_size=2
    )
    storage.write_bytes(f"{bucket}/hub/train-00000.parquet", buf.getvalue())
    prepare_dataset(
        f"{bucket}/hub",
        f"{bucket}/shards/pq16",
        size=16,
        part_size=3,
        workers=2,
        class_names=list(WNIDS),
        progress=False,
    )
    check_dataset(
        f"{bucket}/shards/pq16",
        {f"train-00000.parquet#{i}": (d, WNIDS[c]) for i, (d, c) in enumerate(zip(images, [2, 0, 1, 2]))},
        list(WNIDS),
        16,
    )
