"""Released checkpoint format: round trip, name inference, clear errors for foreign or corrupt files."""

from __future__ import annotations

import argparse
import pickle
from pathlib import Path

import pytest
import torch

from fractalgen.models import CheckpointError, build_model, load_released, save_released


def _released_style_file(path: Path, name: str, seed: int = 0) -> torch.nn.Module:
    """Write what the public release writes: model, optimizer, epoch, scaler and an argparse.Namespace."""
    torch.manual_seed(seed)
    model = build_model(name)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(2, 3, model.config.img_size, model.config.img_size)
    model(x, torch.tensor([0, 1])).backward()
    opt.step()  # the optimizer entry then holds real state tensors
    args = argparse.Namespace(model=name, img_size=model.config.img_size, lr=1e-3, epochs=800, cfg=6.5)
    torch.save(
        {"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": 3, "scaler": {}, "args": args},
        path,
    )
    return model


@pytest.mark.parametrize("name", ["fractalmar_tiny16", "fractalar_tiny16", "fractalmar_tiny32"])
def test_round_trip_gives_identical_outputs(tmp_path: Path, name: str) -> None:
    path = tmp_path / "checkpoint-last.pth"
    src = _released_style_file(path, name).eval()
    loaded = load_released(path)  # name inferred from args.model
    assert loaded.config == src.config
    for (k, a), (k2, b) in zip(src.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    x = torch.randn(3, 3, src.config.img_size, src.config.img_size)
    torch.manual_seed(7)
    nll_a = src.nll_bpd(x)
    torch.manual_seed(7)
    nll_b = loaded.nll_bpd(x)
    assert torch.equal(nll_a, nll_b)
    labels = torch.tensor([1, 2])
    assert torch.equal(src.sample(labels, seed=3, num_iters=(2,) * src.config.num_levels),
                       loaded.sample(labels, seed=3, num_iters=(2,) * src.config.num_levels))  # fmt: skip


def test_save_released_rebuilds_custom_config_without_name(tmp_path: Path) -> None:
    model = build_model("fractalmar_tiny16", num_classes=3, widths=(32, 16, 8), heads=(2, 2, 2))
    path = save_released(model, tmp_path / "ck.pth", args={"note": "custom"})
    loaded = load_released(path)
    assert loaded.config == model.config
    assert loaded.class_emb.weight.shape == (3, 32)
    assert torch.equal(loaded.class_emb.weight, model.class_emb.weight)


def test_name_inferred_from_shapes_when_args_lack_it(tmp_path: Path) -> None:
    model = build_model("fractalar_tiny16")
    torch.save({"model": model.state_dict(), "args": argparse.Namespace(lr=1.0)}, tmp_path / "a.pth")
    assert load_released(tmp_path / "a.pth").config.generators == ("ar", "ar")


class _Evil:
    def __reduce__(self):  # what a malicious pickle would do
        return (exec, ("print('executed!')",))  # exec: Ray, once imported, replaces builtins.print


@pytest.mark.parametrize(
    "content, message",
    [
        (b"this is not a checkpoint", "not a released-format checkpoint"),
        (b"", "not a released-format checkpoint"),
    ],
)
def test_corrupt_files_raise_clear_error(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "bad.pth"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=message):
        load_released(path, "fractalmar_tiny16")


def test_truncated_checkpoint_raises_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "ck.pth"
    save_released(build_model("fractalmar_tiny16"), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not a released-format checkpoint"):
        load_released(path)


def test_foreign_pickle_is_refused_not_executed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "evil.pth"
    torch.save({"model": {}, "payload": _Evil()}, path)
    with pytest.raises(CheckpointError, match=r"safe loading refuses \(builtins\.exec\)"):
        load_released(path, "fractalmar_tiny16")
    assert "executed!" not in capsys.readouterr().out
    path2 = tmp_path / "plain.pkl"
    path2.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(CheckpointError):
        load_released(path2, "fractalmar_tiny16")


def test_missing_model_entry_and_wrong_model(tmp_path: Path) -> None:
    path = tmp_path / "opt.pth"
    torch.save({"optimizer": {}, "epoch": 1}, path)
    with pytest.raises(CheckpointError, match="no 'model' state dict"):
        load_released(path, "fractalmar_tiny16")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_released(tmp_path / "nope.pth", "fractalmar_tiny16")
    ck = tmp_path / "tiny16.pth"
    save_released(build_model("fractalmar_tiny16").state_dict(), ck)
    with pytest.raises(CheckpointError, match="does not fit fractalmar_tiny32"):
        load_released(ck, "fractalmar_tiny32")
