"""A tiny model trained for a few hundred CPU steps on a fixed batch clearly lowers its NLL."""

from __future__ import annotations

import pytest
import torch

from fractalgen.models import IMAGENET_MEAN, IMAGENET_STD, build_model


def _fixed_batch() -> torch.Tensor:
    """Eight smooth 16x16 images (colour ramps), normalised."""
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 16), torch.linspace(0, 1, 16), indexing="ij")
    imgs = [torch.stack([(xx * (i + 1) / 8) % 1, yy, ((xx + yy) / 2 + i / 8) % 1]) for i in range(8)]
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (torch.stack(imgs) - mean) / std


@pytest.mark.slow
@pytest.mark.parametrize("name", ["fractalmar_tiny16", "fractalar_tiny16"])
def test_training_halves_nll(name: str) -> None:
    torch.manual_seed(0)
    # unconditional training (every label dropped) so that the unconditional NLL measures it
    model = build_model(name, attn_dropout=0.0, proj_dropout=0.0, label_drop_prob=1.0)
    x, y = _fixed_batch(), torch.arange(8)
    opt = torch.optim.AdamW(model.parameters(), lr=4e-3, betas=(0.9, 0.95), weight_decay=0.0)
    torch.manual_seed(1)
    start = model.nll_bpd(x, num_passes=4).item()
    assert 7.5 < start < 8.5  # ~uniform over 256 values: 8 bits/dim
    for _ in range(300):
        loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    torch.manual_seed(1)
    end = model.nll_bpd(x, num_passes=4).item()
    assert end < 0.5 * start, (start, end)
