"""Architecture: released state_dict names/shapes, parameter counts, configs that must build, FLOPs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from fractalgen.models import MODEL_CONFIGS, RELEASED_NAMES, build_model, get_config
from fractalgen.models.configs import FractalConfig
from fractalgen.models.fractal import FractalGen
from fractalgen.models.inspect import format_table, level_costs

# the project's shared/ folder lies beside the checkout (or inside it on the GPU machine)
_ROOT = Path(__file__).resolve().parents[2]
REFERENCE = next(
    (p for p in (_ROOT.parent / "shared" / "reference", _ROOT / "shared" / "reference") if p.is_dir()),
    _ROOT.parent / "shared" / "reference",
)

# docs/model.md#configurations: total parameters in millions (those of the released checkpoints)
RELEASED_PARAMS_M = {
    "fractalar_in64": 442.1,
    "fractalmar_in64": 432.0,
    "fractalmar_base_in256": 186.3,
    "fractalmar_large_in256": 437.0,
    "fractalmar_huge_in256": 849.6,
}


def read_reference(name: str) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for line in (REFERENCE / f"{name}.state_dict.tsv").read_text().splitlines():
        if not line or line.startswith("#"):
            continue
        key, shape = line.split("\t")
        shapes[key] = tuple(int(d) for d in re.findall(r"\d+", shape))
    return shapes


@pytest.mark.parametrize("name", RELEASED_NAMES)
def test_state_dict_matches_release(name: str) -> None:
    if not REFERENCE.is_dir():
        pytest.fail(f"reference tables not found at {REFERENCE}")
    with torch.device("meta"):
        model = build_model(name)
    mine = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    ref = read_reference(name)
    assert sorted(set(ref) - set(mine)) == [], "missing"
    assert sorted(set(mine) - set(ref)) == [], "unexpected"
    assert {k: v for k, v in mine.items() if ref[k] != v} == {}, "shape mismatch"
    assert list(mine) == list(ref), "same order as the release"
    total = sum(v.numel() for v in model.state_dict().values())
    assert round(total / 1e6, 1) == RELEASED_PARAMS_M[name]


@pytest.mark.parametrize(
    "sizes, gens",
    [
        ((16, 4, 1), ("mar", "mar")),
        ((32, 8, 2, 1), ("mar", "mar", "mar")),
        ((12, 3, 1), ("ar", "ar")),
        ((8, 1), ("mar",)),
        ((8, 2, 1), ("mar", "ar")),
    ],
)
def test_any_even_sizes_build_and_train(sizes: tuple[int, ...], gens: tuple[str, ...]) -> None:
    n = len(sizes)
    cfg = FractalConfig(
        img_sizes=sizes,
        widths=(32,) * n,
        blocks=(1,) * n,
        heads=(2,) * n,
        generators=gens,  # type: ignore[arg-type]
        num_conds=1 if "ar" in gens else 5,
        num_classes=3,
        guiding_pixel=n > 3,
    )
    model = FractalGen(cfg)
    x = torch.randn(2, 3, sizes[0], sizes[0])
    loss = model(x, torch.tensor([0, 2]))
    loss.backward()
    assert torch.isfinite(loss)
    imgs = model.sample(torch.tensor([1]), seed=0, cfg=1.5, num_iters=(2,) * len(gens))
    assert imgs.shape == (1, 3, sizes[0], sizes[0])


@pytest.mark.parametrize(
    "kw, msg",
    [
        ({"img_sizes": (16, 5, 1)}, "not a multiple"),
        ({"img_sizes": (16, 4, 2)}, "must end with 1"),
        ({"widths": (64, 32)}, "widths needs 3"),
        ({"heads": (3, 2, 2)}, "not divisible"),
        ({"generators": ("mar", "gpt")}, "not 'mar' or 'ar'"),
    ],
)
def test_bad_sizes_are_refused(kw: dict, msg: str) -> None:
    with pytest.raises(ValueError, match=msg):
        get_config("fractalmar_tiny16", **kw)


def test_flops_reproduce_table1_large() -> None:
    """Paper Table 1, FractalMAR-L 256: 215 / 208 / 419 / 22 GFLOPs (forward, batch 1)."""
    rows = level_costs(get_config("fractalmar_large_in256"))
    paper = [215, 208, 419, 22]
    for row, ref in zip(rows, paper):
        assert abs(row.gflops - ref) / ref < 0.02, (row.name, row.gflops, ref)
    assert abs(sum(r.gflops for r in rows) - sum(paper)) / sum(paper) < 0.02
    # Table 1's parameter column counts the transformer blocks: 403M / 25M / 3M / 0.1M
    blocks = [r.block_params / 1e6 for r in rows]
    assert [round(b) for b in blocks[:3]] == [403, 25, 3]
    assert round(blocks[3], 1) <= 0.1
    # the 64x64 model's total is 438 GFLOPs (Table 2)
    total64 = sum(r.gflops for r in level_costs(get_config("fractalmar_in64")))
    assert abs(total64 - 438) / 438 < 0.02


def test_flops_formula_matches_hand_count_for_tiny() -> None:
    """An independent hand count for fractalmar_tiny16 (16 -> 4 -> 1, widths 64/32/16)."""
    rows = level_costs(get_config("fractalmar_tiny16"))
    # g1: one sequence of 16 tokens, D=64, 2 blocks, patch 4x4 (48 values), 5 conditions of 64
    g1 = 2 * 16 * 2 * 12 * 64**2 + 4 * 2 * 16**2 * 64 + 2 * 16 * 48 * 64 + 2 * 5 * 64 * 64
    # g2: 16 sequences of 16 tokens, D=32, 1 block, patch 1 pixel (3 values), conditions of 64
    g2 = 16 * (2 * 16 * 12 * 32**2 + 4 * 16**2 * 32 + 2 * 16 * 3 * 32 + 2 * 5 * 64 * 32)
    # pixel head: 256 pixels, 3 outputs, W=16, 1 block, condition projection 32 -> 16
    g3 = 256 * (2 * 3 * 12 * 16**2 + 4 * 9 * 16 + 2 * 32 * 16)
    assert [r.gflops * 1e9 for r in rows] == pytest.approx([g1, g2, g3])
    # parameters per level sum to the model's
    with torch.device("meta"):
        total = sum(p.numel() for p in build_model("fractalmar_tiny16").parameters())
    assert sum(r.params for r in rows) == total


def test_inspect_cli_prints_table(capsys: pytest.CaptureFixture[str]) -> None:
    from fractalgen.cli import main

    assert main(["inspect", "fractalmar_large_in256"]) == 0
    out = capsys.readouterr().out
    assert out == format_table("fractalmar_large_in256", get_config("fractalmar_large_in256")) + "\n"
    assert "403.1M" in out and "215.2" in out and "total" in out


def test_model_code_never_calls_cuda() -> None:
    """Device placement belongs to the caller (``.to(device)``): no ``.cuda(`` in the model package."""
    sources = sorted((_ROOT / "fractalgen" / "models").glob("*.py"))
    assert len(sources) > 5
    offenders = [
        f"{path.name}:{i}"
        for path in sources
        for i, line in enumerate(path.read_text().splitlines(), start=1)
        if ".cuda(" in line
    ]
    assert offenders == []


def test_unknown_model_name_lists_the_registered_ones() -> None:
    for make in (get_config, build_model):
        with pytest.raises(KeyError) as err:
            make("fractalmar_tiny99")
        msg = str(err.value)
        assert "fractalmar_tiny99" in msg
        assert all(name in msg for name in MODEL_CONFIGS), msg
