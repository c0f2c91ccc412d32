"""Fine-tuning support in the model: partial loads across class counts, class tables, 1-class models."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fractalgen.models import build_model, init_from_checkpoint, parameter_level, save_released


def test_shared_tensors_load_and_class_embedding_is_reinitialised(tmp_path: Path) -> None:
    src = build_model("fractalmar_tiny32")  # 10 classes
    path = save_released(src, tmp_path / "ck.pth")
    torch.manual_seed(123)
    dst = build_model("fractalmar_tiny32", num_classes=3)
    fresh = dst.class_emb.weight.detach().clone()
    report = init_from_checkpoint(dst, path)
    assert report.reinitialised == ["class_emb.weight"]
    assert report.unused == [] and report.mapped == []
    src_sd, dst_sd = src.state_dict(), dst.state_dict()
    assert sorted(report.loaded) == sorted(k for k in dst_sd if k != "class_emb.weight")
    for k in report.loaded:
        assert torch.equal(dst_sd[k], src_sd[k]), k
    assert dst.class_emb.weight.shape == (3, 64)
    assert torch.equal(dst.class_emb.weight, fresh)  # left at its own initialisation


def test_class_table_maps_rows(tmp_path: Path) -> None:
    src = build_model("fractalmar_tiny16")
    path = save_released(src, tmp_path / "ck.pth")
    dst = build_model("fractalmar_tiny16", num_classes=4)
    report = init_from_checkpoint(dst, path, class_map={0: 7, 1: 2, 2: 2})
    assert report.mapped == ["class_emb.weight"]
    assert report.reinitialised == ["class_emb.weight[1 unmapped rows]"]
    w, s = dst.class_emb.weight, src.class_emb.weight
    assert torch.equal(w[0], s[7]) and torch.equal(w[1], s[2]) and torch.equal(w[2], s[2])
    with pytest.raises(ValueError, match="out of range"):
        init_from_checkpoint(dst, path, class_map={0: 99})


def test_unconditional_model_refuses_guidance() -> None:
    model = build_model("fractalmar_tiny16", num_classes=1)
    imgs = model.sample(torch.zeros(2, dtype=torch.long), seed=0, num_iters=(2, 2))
    assert imgs.shape == (2, 3, 16, 16)
    with pytest.raises(ValueError, match="unconditional"):
        model.sample(torch.zeros(1, dtype=torch.long), cfg=2.0)


def test_parameter_levels() -> None:
    model = build_model("fractalmar_tiny32")
    levels = {parameter_level(n) for n, _ in model.named_parameters()}
    assert levels == {0, 1, 2, 3}
    assert parameter_level("class_emb.weight") == 0
    assert parameter_level("next_fractal.generator.guiding_pixel_loss.r_codebook.weight") == 1
    assert parameter_level("next_fractal.next_fractal.next_fractal.r_mlm.bias") == 3
