"""The GPU benchmarks run end to end on a CPU with tiny models (they must not rot between GPU runs)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


def _json_rows(out: str) -> list[dict]:
    return [json.loads(line[5:]) for line in out.splitlines() if line.startswith("JSON ")]


def test_train_and_sample_benchmarks_print_table_and_json(capsys: pytest.CaptureFixture[str]) -> None:
    from bench import sample, train

    assert train.main(["--configs", "fractalmar_tiny16", "--micro-batch", "2", "--steps", "1", "--warmup", "0",
                       "--precision", "fp32", "--ckpt", "--device", "cpu", "--profile", "1"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    rows = _json_rows(out)
    assert rows[0]["config"] == "fractalmar_tiny16" and rows[0]["status"] == "ok" and rows[0]["img_per_s"] > 0
    _check_profile(out, rows[0])
    assert sample.main(["--configs", "fractalmar_tiny16", "--batches", "2", "--num-iters", "2,2",
                        "--precision", "fp32", "--warmup", "0", "--device", "cpu", "--profile", "1"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    rows = _json_rows(out)
    assert rows[0]["bench"] == "sample" and rows[0]["s_per_img"] > 0
    _check_profile(out, rows[0])


def _check_profile(out: str, row: dict) -> None:
    """``--profile``: the operator table is printed and the JSON line carries the top operators."""
    assert "--- profile of" in out and "Self CPU" in out
    top = row["extra"]["profile"]["top_ops"]
    shares = [t["share"] for t in top]
    assert 0 < len(top) <= 12 and all(0 < s <= 1 for s in shares) and sum(shares) <= 1 + 1e-9
    assert shares == sorted(shares, reverse=True)
    # a training step spends its time in real aten operators (matmuls among them)
    assert any(t["op"].startswith("aten::") for t in top)


def test_data_benchmark_reports_every_storage_choice(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from bench import data

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)  # main() clears them; restore them afterwards
    out = tmp_path / "rows.json"
    assert data.main(["--sizes", "8", "--images", "2", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [r["choice"] for r in rows] == list(data.CHOICES)
    table = capsys.readouterr().out
    for r in rows:
        assert r["size"] == 8 and r["images"] == 2, r
        assert r["lossless"] == data.CHOICES[r["choice"]][2]
        for field in ("prepare_img_s", "encode_img_s", "first_epoch_img_s", "cached_epoch_img_s"):
            assert r[field] > 0, (r["choice"], field)
        assert r["cache_B_img"] >= r["stored_B_img"] > 0, r  # the cache holds shards decompressed
        assert f" {r['choice']} " in table
    by_choice = {r["choice"]: r for r in rows}
    assert by_choice["ndarray"]["cache_B_img"] >= 8 * 8 * 3  # raw uint8 pixels at least


def test_scaling_model_matches_hand_count() -> None:
    from bench.scaling import efficiency, step_bytes_per_gpu

    P = 437_000_064
    # ZeRO-2, fp32 gradients, 64 GPUs: one all-reduce of 4-byte gradients
    assert step_bytes_per_gpu(P, 64, 2, 4) == pytest.approx(2 * 63 / 64 * P * 4)
    assert step_bytes_per_gpu(P, 8, 3, 2) == pytest.approx(2 * 7 / 8 * P * 2 + 2 * 7 / 8 * P * 2)
    r = efficiency(params=P, gpus=64, zero=2, grad_bytes=4, global_batch=1024, micro_batch=32,
                   s_per_microbatch=0.356, overlap=0.5)  # fmt: skip
    comm = 2 * 63 / 64 * P * 4 / 50e9  # EFA: 400 GB/s per node of 8 GPUs
    compute = 0.356 / 2  # 16 images per GPU at 0.356 s per 32
    assert r["efficiency"] == pytest.approx(compute / (compute + comm / 2))


def test_train_benchmark_takes_mask_buckets_and_compile_wraps_blocks(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from bench import train
    from fractalgen.models import build_model

    assert train.main(["--configs", "fractalmar_tiny32", "--micro-batch", "2", "--steps", "1", "--warmup", "0",
                       "--precision", "fp32", "--mask-buckets", "4", "--device", "cpu"]) == 0  # fmt: skip
    rows = _json_rows(capsys.readouterr().out)
    assert rows[0]["status"] == "ok" and "mb4" in rows[0]["setting"]
    model = build_model("fractalmar_tiny32")
    keys = list(model.state_dict())
    # blocks: 2 + 1 + 1 in the levels, 1 in the pixel head, 1 in each of the 2 guiding-pixel heads
    assert train.compile_blocks(model, "aot_eager") == 7
    assert list(model.state_dict()) == keys  # compiling (lazily, on first call) leaves the state_dict as is


def test_report_puts_benchmark_rows_against_the_targets(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    from bench import report, train

    assert train.main(["--configs", "fractalmar_tiny16", "--micro-batch", "2", "--steps", "1", "--warmup", "0",
                       "--precision", "fp32", "--device", "cpu"]) == 0  # fmt: skip
    log = tmp_path / "log.txt"
    log.write_text(capsys.readouterr().out)
    assert report.main([str(log)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("| what |") and len(lines) == 3
    assert "train fractalmar_tiny16, micro-batch 2" in lines[2] and "img/s" in lines[2]
    assert lines[2].endswith("| - |")  # no target for a tiny model

    def row(**kw: object) -> dict:
        return {"bench": "train", "config": "fractalmar_in64", "batch": 64, "status": "ok", **kw}

    in64 = report.TARGETS[0]
    assert report.verdict(row(img_per_s=in64.min_img_per_s + 1), in64) == "yes"
    assert report.verdict(row(img_per_s=in64.min_img_per_s - 1), in64) == "no"
    assert report.verdict(row(status="out of memory"), in64) == "no (out of memory)"
    huge = next(t for t in report.TARGETS if t.config == "fractalmar_huge_in256")
    fast = {"img_per_s": 2 * huge.min_img_per_s}
    assert report.verdict(row(**fast, peak_gib=huge.max_gib - 1), huge) == "yes"
    assert report.verdict(row(**fast, peak_gib=huge.max_gib + 1), huge) == "no"  # fast, but too big
    sample = next(t for t in report.TARGETS if t.bench == "sample" and t.config == "fractalmar_in64")
    assert report.verdict(row(bench="sample", s_per_img=sample.max_s_per_img / 2), sample) == "yes"
    empty = tmp_path / "empty.txt"
    empty.touch()
    assert report.main([str(empty)]) == 1  # says there are no rows
