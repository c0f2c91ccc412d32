"""The FID Inception v3 network (pytorch-fid's ``FIDInceptionV3``) and where its weights come from.

Terms:
- *FID Inception*: torchvision's ``Inception3`` (1008 classes, no auxiliary head) with pytorch-fid's
  patches that make it compute what TensorFlow's 2015-12-05 Inception graph computes: average pools
  that ignore the zero padding (``FIDInceptionA``, ``FIDInceptionC``, ``FIDInceptionE_1``) and a max
  pool in the last block (``FIDInceptionE_2``). Parameter names equal torchvision's, so the user's
  ``pt_inception-2015-12-05-6726825d.pth`` (pytorch-fid) or ``weights-inception-2015-12-05-6726825d.pth``
  (torch-fidelity, the file the released FractalGen evaluation uses) loads strictly.
- *pool features*: the 2048-d average-pooled activations (FID, precision/recall).
- *logits*: the 1008-d ``pool @ fc.weight.T`` without the bias (torch-fidelity's ``logits_unbiased``,
  the Inception Score's input).

Inputs are RGB images, uint8 in [0, 255] or float in [0, 1], any size. As in torch-fidelity (the
released evaluation) and TensorFlow's graph, pixel values ``v`` in [0, 255] are resized to 299x299 with
TensorFlow 1.x's bilinear resize (``resize_like_tf1``: source coordinate ``dst * in / out``, no
half-pixel offset; pytorch-fid's ``F.interpolate`` differs from it) and then mapped to ``(v - 128) / 128``
(pytorch-fid: ``2 v / 255 - 1``). ``tests/platform/test_fidelity_parity.py`` checks FID and IS against
torch-fidelity 0.4.0 on the same weights file to 1e-4.

Weights are never downloaded: they come from a path or URI the user gives (``--inception``), else
``FRACTALGEN_INCEPTION_WEIGHTS``, else the caches of pytorch-fid / torch-fidelity / fractalgen
(``default_weight_paths``). A missing file raises ``InceptionWeightsMissing`` saying where to put it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import urllib.parse
import urllib.request
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fractalgen import storage

FID_WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
TORCH_FIDELITY_WEIGHTS_NAME = "weights-inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_ENV = "FRACTALGEN_INCEPTION_WEIGHTS"
FEATURE_DIM = 2048
NUM_LOGITS = 1008
INPUT_SIZE = 299


class InceptionWeightsMissing(FileNotFoundError):
    """No Inception weights file where one was looked for; the message says where to put it."""


class InceptionWeightsError(ValueError):
    """The weights file exists but is not the FID Inception network's state dict."""


def _tv():
    from torchvision.models import inception as tv  # deferred: heavy import

    return tv


def _build_blocks() -> dict[str, type[nn.Module]]:
    tv = _tv()

    class FIDInceptionA(tv.InceptionA):
        """InceptionA, average pool without the padded zeros (TensorFlow's behaviour)."""

        def forward(self, x: Tensor) -> Tensor:
            b1 = self.branch1x1(x)
            b5 = self.branch5x5_2(self.branch5x5_1(x))
            b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
            bp = self.branch_pool(
                F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)
            )
            return torch.cat([b1, b5, b3, bp], 1)

    class FIDInceptionC(tv.InceptionC):
        """InceptionC, average pool without the padded zeros."""

        def forward(self, x: Tensor) -> Tensor:
            b1 = self.branch1x1(x)
            b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
            bd = self.branch7x7dbl_1(x)
            bd = self.branch7x7dbl_5(self.branch7x7dbl_4(self.branch7x7dbl_3(self.branch7x7dbl_2(bd))))
            bp = self.branch_pool(
                F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)
            )
            return torch.cat([b1, b7, bd, bp], 1)

    class _FIDInceptionE(tv.InceptionE):
        def _branches(self, x: Tensor) -> list[Tensor]:
            b1 = self.branch1x1(x)
            b3 = self.branch3x3_1(x)
            b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
            bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
            bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
            return [b1, b3, bd]

    class FIDInceptionE_1(_FIDInceptionE):
        """First InceptionE block, average pool without the padded zeros."""

        def forward(self, x: Tensor) -> Tensor:
            bp = self.branch_pool(
                F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)
            )
            return torch.cat([*self._branches(x), bp], 1)

    class FIDInceptionE_2(_FIDInceptionE):
        """Second InceptionE block: the TensorFlow graph uses a max pool here."""

        def forward(self, x: Tensor) -> Tensor:
            bp = self.branch_pool(F.max_pool2d(x, kernel_size=3, stride=1, padding=1))
            return torch.cat([*self._branches(x), bp], 1)

    return {"A": FIDInceptionA, "C": FIDInceptionC, "E_1": FIDInceptionE_1, "E_2": FIDInceptionE_2}


def resize_like_tf1(x: Tensor, size: int) -> Tensor:
    """TensorFlow 1.x's bilinear resize (``align_corners=False``) of x (B, C, H, W) to (size, size).

    The source coordinate of output pixel ``i`` is ``i * in / out`` (no half-pixel offset), clamped at the
    last row/column: the resize of the 2015-12-05 Inception graph, computed as torch-fidelity's
    ``interpolate_bilinear_2d_like_tensorflow1x`` computes it (same float32 operations, so equal bits).
    """

    def axis(n_in: int) -> tuple[Tensor, Tensor, Tensor]:
        pos = torch.arange(size, dtype=x.dtype, device=x.device) * torch.tensor(
            n_in / size, dtype=torch.float32
        )
        lo = pos.long()
        hi = (lo + 1).clamp_max(n_in - 1)
        return lo, hi, pos - lo.float()

    ylo, yhi, dy = axis(x.shape[-2])
    xlo, xhi, dx = axis(x.shape[-1])
    top, bottom = x.index_select(-2, ylo), x.index_select(-2, yhi)  # (B, C, size, W)
    t0, t1 = top.index_select(-1, xlo), top.index_select(-1, xhi)
    b0, b1 = bottom.index_select(-1, xlo), bottom.index_select(-1, xhi)
    row0 = t0 + (t1 - t0) * dx.view(1, 1, 1, size)
    row1 = b0 + (b1 - b0) * dx.view(1, 1, 1, size)
    return row0 + (row1 - row0) * dy.view(1, 1, size, 1)


class FIDInceptionV3(nn.Module):
    """pytorch-fid's FID Inception v3: ``forward(images01) -> (pool (B, 2048), logits (B, 1008))``."""

    def __init__(self) -> None:
        super().__init__()
        tv = _tv()
        net = tv.Inception3(num_classes=NUM_LOGITS, aux_logits=False, init_weights=False)
        blocks = _build_blocks()
        net.Mixed_5b = blocks["A"](192, pool_features=32)
        net.Mixed_5c = blocks["A"](256, pool_features=64)
        net.Mixed_5d = blocks["A"](288, pool_features=64)
        net.Mixed_6b = blocks["C"](768, channels_7x7=128)
        net.Mixed_6c = blocks["C"](768, channels_7x7=160)
        net.Mixed_6d = blocks["C"](768, channels_7x7=160)
        net.Mixed_6e = blocks["C"](768, channels_7x7=192)
        net.Mixed_7b = blocks["E_1"](1280)
        net.Mixed_7c = blocks["E_2"](2048)
        # keep torchvision's module names: the state dict keys are those of the published files
        for name, child in net.named_children():
            if name not in ("AuxLogits", "dropout"):
                self.add_module(name, child)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """images (B, 3, H, W) RGB, uint8 in [0, 255] or float in [0, 1] -> pool features (B, 2048),
        unbiased logits (B, 1008)."""
        x = images.float() if images.dtype == torch.uint8 else images.float() * 255  # [0, 255]
        if x.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
            x = resize_like_tf1(x, INPUT_SIZE)
        x = (x - 128) / 128  # (B, 3, 299, 299) in [-1, 1), as the TensorFlow graph and torch-fidelity
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))  # (B, 64, 147, 147)
        x = self.maxpool1(x)  # (B, 64, 73, 73)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))  # (B, 192, 71, 71)
        x = self.maxpool2(x)  # (B, 192, 35, 35)
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))  # (B, 288, 35, 35)
        x = self.Mixed_6a(x)  # (B, 768, 17, 17)
        x = self.Mixed_6e(self.Mixed_6d(self.Mixed_6c(self.Mixed_6b(x))))  # (B, 768, 17, 17)
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))  # (B, 2048, 8, 8)
        pool = torch.flatten(self.avgpool(x), 1)  # (B, 2048)
        logits = pool @ self.fc.weight.t()  # (B, 1008) torch-fidelity's logits_unbiased
        return pool, logits


# ----------------------------------------------------------------------------------------- weights
def default_weight_paths() -> list[Path]:
    """Where weights are looked for when no path is given, in order."""
    paths: list[Path] = []
    env = os.environ.get(WEIGHTS_ENV)
    if env:
        paths.append(Path(env).expanduser())
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")).expanduser()
    paths.append(cache / "fractalgen" / FID_WEIGHTS_NAME)
    try:
        hub = Path(torch.hub.get_dir()) / "checkpoints"
        paths += [hub / FID_WEIGHTS_NAME, hub / TORCH_FIDELITY_WEIGHTS_NAME]
    except Exception:  # pragma: no cover - torch.hub without a home folder
        pass
    return paths


def _missing_message(looked: Iterable[Path | str]) -> str:
    looked = [str(p) for p in looked]
    first = looked[0] if looked else f"~/.cache/fractalgen/{FID_WEIGHTS_NAME}"
    return (
        "Inception weights for FID/IS were not found (looked at: " + ", ".join(looked) + "). "
        f"Nothing is downloaded at run time: fetch {FID_WEIGHTS_NAME} (pytorch-fid's FID Inception, "
        f"{FID_WEIGHTS_URL}) or torch-fidelity's {TORCH_FIDELITY_WEIGHTS_NAME} on a machine with internet "
        f"access and put it at {first}, or pass --inception PATH_OR_URI, or set {WEIGHTS_ENV}."
    )


def resolve_weights(uri: str | os.PathLike[str] | None = None, *, cache_dir: str | None = None) -> Path:
    """A local path of the Inception weights for ``uri`` (path, ``file://``, ``s3://``, ``http(s)://``).

    ``None`` searches ``default_weight_paths()``. Remote files are copied once into ``cache_dir``
    (default ``~/.cache/fractalgen``). ``InceptionWeightsMissing`` when nothing is there.
    """
    if uri is None:
        candidates = default_weight_paths()
        for path in candidates:
            if path.is_file():
                return path
        raise InceptionWeightsMissing(_missing_message(candidates))
    text = str(uri)
    scheme = urllib.parse.urlparse(text).scheme
    if scheme in ("", "file") or (len(scheme) == 1 and os.name == "nt"):
        path = Path(urllib.parse.urlparse(text).path if scheme == "file" else text).expanduser()
        if not path.is_file():
            raise InceptionWeightsMissing(_missing_message([path]))
        return path
    cache = Path(cache_dir or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fractalgen")
    name = os.path.basename(urllib.parse.urlparse(text).path) or FID_WEIGHTS_NAME
    local = cache / "inception" / f"{hashlib.sha256(text.encode()).hexdigest()[:16]}-{name}"
    if local.is_file():
        return local
    local.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=local.parent, suffix=".tmp")
    os.close(fd)
    try:
        if scheme == "s3":
            if not storage.exists(text):
                raise InceptionWeightsMissing(_missing_message([text]))
            storage.download_file(text, tmp)
        elif scheme in ("http", "https"):
            try:
                with urllib.request.urlopen(text, timeout=60) as resp, open(tmp, "wb") as out:
                    shutil.copyfileobj(resp, out)
            except OSError as err:
                raise InceptionWeightsMissing(
                    f"could not read Inception weights from {text}: {err}"
                ) from None
        else:
            raise InceptionWeightsMissing(f"unsupported URI scheme {scheme!r} for Inception weights: {text}")
        os.replace(tmp, local)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return local


def load_inception(
    uri: str | os.PathLike[str] | None = None, *, device: str | torch.device = "cpu"
) -> FIDInceptionV3:
    """The FID Inception network holding the weights at ``uri`` (see ``resolve_weights``), in eval mode.

    The state dict must match every parameter and buffer name and shape; only BatchNorm's
    ``num_batches_tracked`` counters (unused in evaluation, absent from converted files) may be missing.
    """
    path = resolve_weights(uri)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        from fractalgen.models.checkpoint import (
            load_failure,
        )  # deferred: heavy import # torch's reason, without its unsafe advice

        raise InceptionWeightsError(
            f"{path} is not a PyTorch weights file: {load_failure(path, err)}"
        ) from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise InceptionWeightsError(f"{path} holds a {type(state).__name__}, not a state dict")
    with torch.device("meta"):
        net = FIDInceptionV3()
    expected = net.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    wrong = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or wrong:
        raise InceptionWeightsError(
            f"{path} is not the FID Inception v3 ({FID_WEIGHTS_NAME}): missing {missing[:4]}, "
            f"unexpected {unexpected[:4]}, wrong shapes {wrong[:4]}"
        )
    for key, value in expected.items():
        if key not in state:  # num_batches_tracked
            state[key] = torch.zeros((), dtype=value.dtype)
    net.load_state_dict(state, strict=True, assign=True)
    return net.to(device).eval().requires_grad_(False)


def write_random_weights(path: str | os.PathLike[str], *, seed: int = 0) -> Path:
    """Write a randomly initialised FID Inception state dict (tests; the demo without real weights).

    Features of such a network rank image sets arbitrarily: FID values from it are NOT comparable to
    published ones.
    """
    torch.manual_seed(seed)
    net = FIDInceptionV3()
    # BatchNorm statistics from one batch of noise images, so every layer's output has unit scale
    # (PyTorch's default initialisation alone makes the features vanish over ~95 layers)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None  # cumulative average: one batch sets the statistics
    with torch.no_grad():  # noise at several resolutions, as small generated images look after resizing
        noise = [
            F.interpolate(torch.rand(1, 3, s, s), size=INPUT_SIZE, mode="bilinear")
            for s in (2, 4, 8, 16, 32, 64)
        ]
        net.train()(torch.cat(noise))
    net.eval()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(net.state_dict(), tmp)
    os.replace(tmp, path)
    return path


# ----------------------------------------------------------------------------------------- features
@torch.no_grad()
def extract_features(
    net: FIDInceptionV3, images: Tensor | np.ndarray, *, batch_size: int = 64
) -> tuple[np.ndarray, np.ndarray]:
    """Pool features (N, 2048) and logits (N, 1008), float64, for images in [0, 1] (N, 3, H, W)
    or uint8 (N, H, W, 3) (the layout of ADM's ``arr_0``) or (N, 3, H, W)."""
    device = next(net.parameters()).device
    feats, logits = [], []
    n = len(images)
    for i in range(0, n, batch_size):
        chunk = images[i : i + batch_size]
        x = torch.as_tensor(np.asarray(chunk)) if isinstance(chunk, np.ndarray) else chunk
        if x.dtype == torch.uint8 and x.shape[-1] == 3:
            x = x.permute(0, 3, 1, 2)  # NHWC -> NCHW; uint8 goes to the network as is
        pool, lg = net(x.to(device))
        feats.append(pool.double().cpu().numpy())
        logits.append(lg.double().cpu().numpy())
    if not feats:
        return np.zeros((0, FEATURE_DIM)), np.zeros((0, NUM_LOGITS))
    return np.concatenate(feats), np.concatenate(logits)
