"""Two ranks in separate processes (as Ray Train runs them): disjoint samples covering the epoch.

Each rank is a process with the torch.distributed environment Ray Train's torch backend sets
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, a gloo process group), both on this
node, sharing one per-run cache. The same shards are read from a local folder and, written through
moto's S3 server, from s3:// (one pair of processes for both, to keep the test short).
"""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

import numpy as np
import pytest
from pipelines_helpers import WNIDS, make_folder_source, normalised, reference_crop, run_python

from fractalgen import storage
from fractalgen.pipelines.prepare import prepare_dataset

RANK_SCRIPT = """
import os, sys
import numpy as np
import torch.distributed as dist
rank, uris, out = int(sys.argv[1]), sys.argv[2].split(","), sys.argv[3]
dist.init_process_group("gloo", rank=rank, world_size=2)
from fractalgen.pipelines.loader import build_loader
result = {}
for n, uri in enumerate(uris):
    loader = build_loader(uri, micro_batch=4, rank=rank, world_size=2, flip=False, return_keys=True, seed=3)
    keys, labels, images = [], [], []
    for x, y, k in loader:
        keys += k
        labels.append(y.numpy())
        images.append(x.numpy())
    result.update({f"keys{n}": np.array(keys), f"labels{n}": np.concatenate(labels),
                   f"images{n}": np.concatenate(images), f"cache{n}": np.array(loader.local_cache)})
np.savez(out, **result)
dist.destroy_process_group()
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(rank: int, uris: list[str], out: Path, env: dict[str, str]) -> subprocess.Popen:
    code = RANK_SCRIPT.replace(
        'int(sys.argv[1]), sys.argv[2].split(","), sys.argv[3]', f"{rank}, {uris!r}, {str(out)!r}"
    )
    return run_python(code, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _run_ranks(uris: list[str], tmp_path: Path, extra_env: dict[str, str]) -> list[dict]:
    """Both ranks read every dataset in ``uris``; returns per rank the arrays they saved."""
    port = str(_free_port())
    procs = []
    for rank in range(2):
        env = {
            "RANK": str(rank),
            "WORLD_SIZE": "2",
            "LOCAL_RANK": str(rank),
            "LOCAL_WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
            **extra_env,
        }
        procs.append(_start(rank, uris, tmp_path / f"rank{rank}.npz", env))
    results = []
    for rank, proc in enumerate(procs):
        try:
            output, _ = proc.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
        assert proc.returncode == 0, f"rank {rank} failed:\n{output}"
        with np.load(tmp_path / f"rank{rank}.npz") as f:
            results.append({k: f[k] for k in f.files})
    return results


@pytest.mark.s3
@pytest.mark.slow
def test_two_ranks_see_disjoint_samples_covering_the_epoch(s3_server, tmp_path: Path) -> None:
    source = make_folder_source(tmp_path / "src", np.random.default_rng(20), per_class=8, val=1)["train"]
    local_uri = str(tmp_path / "in16")
    s3_uri = f"s3://{s3_server.new_bucket()}/datasets/in16"
    for uri in (local_uri, s3_uri):
        prepare_dataset(
            str(tmp_path / "src"), uri, size=16, workers=2, part_size=10, compression="zstd", progress=False
        )
    assert storage.exists(storage.join(s3_uri, "index.json"))

    ranks = _run_ranks([local_uri, s3_uri], tmp_path, dict(s3_server.env))
    for n in range(2):  # 0: local folder, 1: S3
        keys = [list(r[f"keys{n}"]) for r in ranks]
        assert len(keys[0]) == len(keys[1]) == 12  # 24 samples / 2 ranks, 3 batches of 4 each
        assert not set(keys[0]) & set(keys[1])
        assert sorted(keys[0] + keys[1]) == sorted(source)
        assert str(ranks[0][f"cache{n}"]) == str(
            ranks[1][f"cache{n}"]
        )  # ranks of a node share the run's cache
        for r in ranks:
            for key, label, image in zip(r[f"keys{n}"], r[f"labels{n}"], r[f"images{n}"]):
                data, wnid = source[str(key)]
                assert label == WNIDS.index(wnid)
                np.testing.assert_allclose(image, normalised(reference_crop(data, 16)), atol=1e-5)
