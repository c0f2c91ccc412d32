"""The streaming loader: normalised batches, flips, per-rank sharding, mid-epoch resume, errors."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from pipelines_helpers import WNIDS, make_folder_source, normalised, reference_crop

from fractalgen.pipelines import DataError
from fractalgen.pipelines.loader import build_loader
from fractalgen.pipelines.prepare import prepare_dataset

SIZE = 16


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> dict:
    """48 images in 3 classes, prepared twice: plain shards and zstd-compressed shards."""
    root = tmp_path_factory.mktemp("loader")
    source = make_folder_source(root / "src", np.random.default_rng(10), per_class=16, val=1)["train"]
    plain, packed = str(root / "plain"), str(root / "zstd")
    prepare_dataset(str(root / "src"), plain, size=SIZE, part_size=20, progress=False)
    prepare_dataset(str(root / "src"), packed, size=SIZE, part_size=20, compression="zstd", progress=False)
    expected = {key: (WNIDS.index(wnid), reference_crop(data, SIZE)) for key, (data, wnid) in source.items()}
    return {"plain": plain, "zstd": packed, "expected": expected}


@pytest.fixture(autouse=True)
def _single_process_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # build_loader exports the rank layout for streaming; keep tests independent of each other.
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.setenv(name, "0")  # records the original state, restored after the test
        monkeypatch.delenv(name)


def _epoch(loader) -> tuple[list[str], list]:
    keys, batches = [], []
    for images, labels, batch_keys in loader:
        keys += batch_keys
        batches.append((images, labels, batch_keys))
    return keys, batches


def test_batches_are_normalised_crops_with_labels(dataset: dict) -> None:
    loader = build_loader(dataset["plain"], micro_batch=5, rank=0, world_size=1, flip=False, return_keys=True)
    assert loader.summary["num_classes"] == 3 and loader.summary["class_names"] == list(WNIDS)
    keys, batches = _epoch(loader)
    assert len(batches) == 9  # 48 samples, batches of 5, last partial batch dropped
    assert len(set(keys)) == 45 and set(keys) <= set(dataset["expected"])
    for images, labels, batch_keys in batches:
        assert images.dtype.is_floating_point and str(images.dtype) == "torch.float32"
        assert images.shape == (5, 3, SIZE, SIZE) and str(labels.dtype) == "torch.int64"
        for image, label, key in zip(images.numpy(), labels.tolist(), batch_keys):
            want_label, want_image = dataset["expected"][key]
            assert label == want_label
            np.testing.assert_allclose(image, normalised(want_image), atol=1e-5)
    # shuffled, and a different seed gives another order
    other, _ = _epoch(
        build_loader(
            dataset["plain"], micro_batch=5, rank=0, world_size=1, flip=False, return_keys=True, seed=1
        )
    )
    assert keys != sorted(keys) and other != keys
    # without drop_last the epoch holds every sample once
    full, _ = _epoch(
        build_loader(
            dataset["plain"],
            micro_batch=5,
            rank=0,
            world_size=1,
            drop_last=False,
            return_keys=True,
            shuffle=False,
        )
    )
    assert sorted(full) == sorted(dataset["expected"])


def test_flip_is_random_and_reproducible(dataset: dict) -> None:
    runs = []
    for _ in range(2):
        loader = build_loader(
            dataset["plain"], micro_batch=8, rank=0, world_size=1, flip=True, return_keys=True, seed=5
        )
        flipped = {}
        for images, _, keys in loader:
            for image, key in zip(images.numpy(), keys):
                plain = normalised(dataset["expected"][key][1])
                if np.allclose(image, plain, atol=1e-5) and not np.allclose(
                    image, plain[:, :, ::-1], atol=1e-5
                ):
                    flipped[key] = False
                else:
                    np.testing.assert_allclose(image, plain[:, :, ::-1], atol=1e-5)
                    flipped[key] = True
        runs.append(flipped)
    assert runs[0] == runs[1]
    assert 8 <= sum(runs[0].values()) <= 40  # about half of 48


@pytest.mark.parametrize("num_workers", [0, 2])
def test_state_restored_mid_epoch_yields_exactly_the_rest(dataset: dict, num_workers: int) -> None:
    uri = dataset["zstd"]  # compressed: shards go through a per-run local cache
    reference, _ = _epoch(
        build_loader(
            uri,
            micro_batch=4,
            rank=0,
            world_size=1,
            flip=False,
            return_keys=True,
            seed=7,
            num_workers=num_workers,
        )
    )
    assert sorted(reference) == sorted(dataset["expected"])

    loader = build_loader(
        uri,
        micro_batch=4,
        rank=0,
        world_size=1,
        flip=False,
        return_keys=True,
        seed=7,
        num_workers=num_workers,
    )
    seen = []
    for step, (_, _, keys) in enumerate(loader):
        seen += keys
        if step == 4:
            state = loader.state_dict()
            break
    assert state["epoch"] == 0 and state["sample_in_epoch"] == 20
    del loader

    resumed = build_loader(
        uri,
        micro_batch=4,
        rank=0,
        world_size=1,
        flip=False,
        return_keys=True,
        seed=7,
        num_workers=num_workers,
    )
    assert resumed.local_cache != uri and os.path.isdir(resumed.local_cache)
    resumed.load_state_dict(state)
    rest, _ = _epoch(resumed)
    assert seen == reference[:20]
    assert rest == reference[20:]  # no repeats, no gaps, same order as the uninterrupted epoch
    nxt, _ = _epoch(resumed)  # and the next epoch is a full one again
    assert sorted(nxt) == sorted(dataset["expected"])


def test_each_loader_without_local_cache_gets_its_own_cache(dataset: dict) -> None:
    # Two runs on one node reading the same compressed dataset must not share a cache folder
    # (streaming ties a folder to one run's shared memory and would reject or corrupt the second).
    uri = dataset["zstd"]
    loaders = [build_loader(uri, micro_batch=4, rank=0, world_size=1, return_keys=True) for _ in range(2)]
    caches = [loader.local_cache for loader in loaders]
    assert caches[0] != caches[1]
    assert os.path.dirname(caches[0]) != os.path.dirname(caches[1])  # separate run folders
    assert uri not in caches and not any(c.startswith(os.path.abspath(uri)) for c in caches)
    for loader in loaders:  # each one reads the whole dataset through its own folder
        keys = [key for _, _, batch_keys in loader for key in batch_keys]
        assert len(keys) == 48 and set(keys) == set(dataset["expected"])
        assert os.path.isdir(loader.local_cache) and os.listdir(loader.local_cache)


def test_missing_or_incomplete_dataset_is_a_clear_error(dataset: dict, tmp_path: Path) -> None:
    missing = str(tmp_path / "nothing-here")
    with pytest.raises(DataError, match="nothing-here"):
        build_loader(missing, micro_batch=2, rank=0, world_size=1)
    # a conversion whose index was never published
    src = make_folder_source(tmp_path / "src", np.random.default_rng(11), per_class=2, val=1)
    assert src
    out = tmp_path / "half"
    prepare_dataset(str(tmp_path / "src"), str(out), size=8, progress=False)
    (out / "index.json").unlink()
    with pytest.raises(DataError, match="resume"):
        build_loader(str(out), micro_batch=2, rank=0, world_size=1)
    # a shard deleted under the index
    prepare_dataset(str(tmp_path / "src"), str(out), size=8, progress=False)
    next(out.glob("part-*/shard.*")).unlink()
    with pytest.raises(DataError, match="missing 1 of 1 shard"):
        build_loader(str(out), micro_batch=2, rank=0, world_size=1)


def test_rank_environment_must_agree(dataset: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(DataError, match="RANK=1"):
        build_loader(dataset["plain"], micro_batch=2, rank=0, world_size=2)
    with pytest.raises(DataError, match="invalid rank"):
        build_loader(dataset["plain"], micro_batch=2, rank=2, world_size=2)
