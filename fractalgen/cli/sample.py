"""``fractalgen sample``: images from a registered model, a training checkpoint or a released file.

Writes one PNG per image (``00000_class3.png``), a grid (``grid.png``) and ``sample.json`` (the
source, labels and resolved sampling settings). ``--animate`` also writes ``generation.gif``: the
generation process pixel by pixel, as in the paper's figures. ``--input`` with ``--mask`` or
``--region`` keeps the given pixels and generates the rest (inpainting, outpainting, uncropping,
class-conditional editing; docs/model.md#conditional-prediction, the paper's section 5.3).

Terms:
- *sampling settings*: see ``fractalgen.sampling_settings.SamplingSettings``. Flags not
  given fall back to the best settings a sweep recorded on a registered version (``sampling.*``
  tags; ``--no-best-settings`` skips them), then to the model's released defaults.
- *generation order*: the order in which the model fixes pixels. ``GenerationRecorder`` observes it
  without changing the model: it wraps each level's ``generator.sample`` (and ``predict`` for MAR
  levels, whose argument ``mask`` says which patches are still masked at each step) on the instance,
  logs an event list, and replays it onto a canvas afterwards. A MAR step's predicted positions are
  ``mask(step) & ~mask(step + 1)``; an AR level predicts position ``step`` of each unfinished item.
- *mask image*: white (non-zero) pixels are generated, black ones are kept from the input.
- *regions*: ``center`` generates the central half (inpainting), ``outpaint`` keeps the central half
  and generates the border (uncropping), ``left``/``right``/``top``/``bottom`` generate that half.
"""

from __future__ import annotations

import argparse
import atexit
import json
import logging
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fractalgen.cli import CLIError
from fractalgen.config import finite_float, positive_float
from fractalgen.platform.images import auto_scale, make_grid, save_png, to_uint8_hwc
from fractalgen.sampling_settings import SamplingSettings, parse_iters

if TYPE_CHECKING:
    from torch import Tensor

    from fractalgen.sampling_settings import SamplingSettings

log = logging.getLogger(__name__)

REGIONS = ("center", "outpaint", "left", "right", "top", "bottom")
BACKGROUND = 0.5  # grey for not-yet-generated pixels in the animation


# ------------------------------------------------------------------------------------ shared flags
def add_sampling_args(p: argparse.ArgumentParser) -> None:
    """The sampling flags shared by ``sample``, ``eval fid`` and ``registry``."""
    g = p.add_argument_group(
        "sampling settings (default: the version's best sweep settings, else the model's)"
    )
    g.add_argument("--cfg", type=finite_float, help="classifier-free guidance scale (1.0: none)")
    g.add_argument(
        "--cfg-schedule",
        metavar="SPEC",
        help="guidance schedule over the top level's steps: constant, linear (released), cosine, "
        "power-cosine:exponent=K, interval:start=A,end=B (docs/model.md#guidance-schedules)",
    )
    g.add_argument(
        "--lower-cfg",
        type=finite_float,
        help="guidance scale of the levels below the top (default: the top step's weight, released)",
    )
    g.add_argument(
        "--lower-cfg-schedule", metavar="SPEC", help="schedule of --lower-cfg over each lower level's steps"
    )
    g.add_argument(
        "--temperature", type=finite_float, help="multiplies the logits (released meaning: > 1 sharpens)"
    )
    g.add_argument(
        "--temperature-end",
        type=finite_float,
        help="ramp the temperature linearly to this over the top level's steps (default: constant)",
    )
    g.add_argument("--num-iters", help="iterations per level, e.g. 64,16 (AR levels always take seq_len)")
    g.add_argument(
        "--filter-threshold", type=finite_float, default=1e-4, help="CFG filter threshold (default 1e-4)"
    )
    g.add_argument(
        "--no-best-settings", action="store_true", help="ignore sampling.* tags of a registered version"
    )


def settings_from_args(args: argparse.Namespace, source: Any = None) -> SamplingSettings:
    """SamplingSettings from the flags, over the registered version's best settings (unless disabled)."""

    try:
        flags = SamplingSettings(
            num_iters=parse_iters(args.num_iters) if args.num_iters else None,
            cfg=args.cfg,
            cfg_schedule=args.cfg_schedule,
            lower_cfg=args.lower_cfg,
            lower_cfg_schedule=args.lower_cfg_schedule,
            temperature=args.temperature,
            temperature_end=args.temperature_end,
            filter_threshold=args.filter_threshold,
        )
        base = SamplingSettings()
        if source is not None and not args.no_best_settings:
            base = source.best_settings
        return base.merged(flags)
    except ValueError as err:
        raise CLIError(str(err)) from None


def parse_labels(text: str | None, config: Any) -> list[int]:
    """``"3,7"`` or class names (``"coffee,rocket"``) -> class indices, checked against the model."""
    if not text:
        return []
    names = list(config.class_names)
    out = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        if part.lstrip("-").isdigit():
            idx = int(part)
        elif part in names:
            idx = names.index(part)
        else:
            known = (
                f" (class names: {', '.join(names[:20])}{' ...' if len(names) > 20 else ''})" if names else ""
            )
            raise CLIError(f"unknown class {part!r}{known}")
        if not 0 <= idx < config.num_classes:
            raise CLIError(
                f"class {idx} is out of range: the model has {config.num_classes} classes (0..{config.num_classes - 1})"
            )
        out.append(idx)
    return out


# ------------------------------------------------------------------------------------ inpainting
def load_input_image(path: str | os.PathLike[str], size: int) -> Tensor:
    """An image file -> (3, size, size) in [0, 1]: ADM centre crop to ``size``."""
    import numpy as np  # deferred: heavy import
    import torch  # deferred: heavy import
    from PIL import Image  # deferred: heavy import

    from fractalgen.pipelines.crop import center_crop_arr  # deferred: heavy import

    try:
        img = Image.open(path).convert("RGB")
    except (OSError, ValueError) as err:
        raise CLIError(f"cannot read input image {path}: {err}") from None
    arr = np.asarray(center_crop_arr(img, size))
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 255.0


def load_mask_image(path: str | os.PathLike[str], size: int) -> Tensor:
    """A mask file (white = generate) -> known mask (size, size) bool, True where the pixel is kept."""
    import numpy as np  # deferred: heavy import
    import torch  # deferred: heavy import
    from PIL import Image  # deferred: heavy import

    try:
        img = Image.open(path).convert("L")
    except (OSError, ValueError) as err:
        raise CLIError(f"cannot read mask image {path}: {err}") from None
    if img.size != (size, size):
        img = img.resize((size, size), Image.NEAREST)
    return torch.from_numpy(np.asarray(img) < 128)


def region_mask(region: str, size: int) -> Tensor:
    """Known mask (size, size) bool (True = kept) for a named region to generate (module docstring)."""
    import torch  # deferred: heavy import

    known = torch.ones(size, size, dtype=torch.bool)
    q, h = size // 4, size // 2
    if region == "center":
        known[q : q + h, q : q + h] = False
    elif region == "outpaint":
        known[:] = False
        known[q : q + h, q : q + h] = True
    elif region == "left":
        known[:, :h] = False
    elif region == "right":
        known[:, h:] = False
    elif region == "top":
        known[:h] = False
    elif region == "bottom":
        known[h:] = False
    else:
        raise CLIError(f"unknown region {region!r}: choose one of {', '.join(REGIONS)}")
    return known


# ------------------------------------------------------------------------------------ animation
class GenerationRecorder:
    """Observe the order in which ``model.sample`` fixes pixels, then replay it as frames.

    Use as a context manager around ``model.sample``; ``frames(final)`` returns up to ``max_frames``
    canvases (B, 3, S, S) in [0, 1], one per pixel-head call of the lowest level (subsampled evenly),
    ending with the final images. Not-yet-generated pixels are grey (given ones shown from the start).
    """

    def __init__(self, model: Any) -> None:
        from fractalgen.models.fractal import FractalGen  # deferred: heavy import

        self.model = model
        self.levels: list[Any] = []
        m = model
        while isinstance(m, FractalGen):
            self.levels.append(m)
            m = m.next_fractal
        self.events: list[tuple] = []
        self._items: dict[int, int] = {}
        self.known = None
        self.known_mask = None

    def __enter__(self) -> GenerationRecorder:
        for level, fractal in enumerate(self.levels):
            gen = fractal.generator
            gen.sample = self._wrap_sample(level, gen.sample)
            if hasattr(gen, "predict") and self.model.config.generators[level] == "mar":
                gen.predict = self._wrap_predict(level, gen.predict)
        return self

    def __exit__(self, *exc: object) -> None:
        for fractal in self.levels:
            for name in ("sample", "predict"):
                fractal.generator.__dict__.pop(name, None)  # back to the class's methods

    def _wrap_sample(self, level: int, orig):
        def sample(conds, *, next_level, known=None, known_mask=None, settings, **kw):
            n = len(conds) // 2 if settings.guided else len(conds)
            self._items[level] = n
            km = None if known_mask is None else known_mask.detach().cpu().clone()
            self.events.append(("enter", level, n, km))

            def recorded_next(c, w, k, m, s):
                self.events.append(("next", level))
                out = next_level(c, w, k, m, s)
                self.events.append(("done", level, out.detach().float().cpu().clone()))
                return out

            res = orig(
                conds, next_level=recorded_next, known=known, known_mask=known_mask, settings=settings, **kw
            )
            self.events.append(("exit", level, res.detach().float().cpu().clone()))
            return res

        return sample

    def _wrap_predict(self, level: int, orig):
        def predict(patches, mask, conds):
            self.events.append(("mask", level, mask[: self._items[level]].detach().cpu().clone()))
            return orig(patches, mask, conds)

        return predict

    # -- replay
    def frames(self, final: Tensor, *, max_frames: int = 120, hold: int = 8) -> list[Tensor]:
        import torch  # deferred: heavy import

        from fractalgen.models import IMAGENET_MEAN, IMAGENET_STD  # deferred: heavy import
        from fractalgen.models.patches import patchify_mask  # deferred: heavy import

        cfg = self.model.config
        sizes, kinds, n_levels = cfg.img_sizes, cfg.generators, cfg.num_levels
        B, S = final.size(0), cfg.img_size
        mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        canvas = torch.full((B, 3, S, S), BACKGROUND)
        if self.known is not None and self.known_mask is not None:
            canvas = torch.where(self.known_mask.unsqueeze(1), self.known.float().cpu(), canvas)
        emits = sum(1 for e in self.events if e[0] == "done" and e[1] == n_levels - 1)
        keep_every = max(1, math.ceil(emits / max(1, max_frames - 1)))
        frames: list[Any] = [canvas.clone()]
        events, pos, emitted = self.events, 0, 0

        def paint(values, regions, side):
            vals = (values.reshape(-1, 3, side, side) * std + mean).clamp(0, 1)
            for v, (b, y, x) in zip(vals, regions):
                canvas[b, :, y : y + side, x : x + side] = v

        def parse(level: int, regions: list[tuple[int, int, int]]) -> None:
            nonlocal pos, emitted
            ev = events[pos]
            assert ev[0] == "enter" and ev[1] == level, ev[:2]
            pos += 1
            p = sizes[level + 1]
            g = sizes[level] // p
            n = len(regions)
            full = patchify_mask(ev[3], p).all(dim=-1) if ev[3] is not None else None  # (n, L)
            mask, ar_step = None, 0
            while True:
                ev = events[pos]
                if ev[1] == level and ev[0] == "mask":
                    mask, pos = ev[2], pos + 1
                    continue
                if ev[1] == level and ev[0] == "exit":
                    pos += 1
                    paint(ev[2], regions, sizes[level])
                    return
                assert ev[0] == "next" and ev[1] == level, ev[:2]
                pos += 1
                if kinds[level] == "mar":
                    nxt = next(e for e in events[pos:] if e[1] == level and e[0] in ("mask", "exit"))
                    following = nxt[2] if nxt[0] == "mask" else torch.zeros_like(mask)
                    to_pred = mask & ~following
                else:
                    to_pred = torch.zeros(n, g * g, dtype=torch.bool)
                    while full is not None and bool(full[:, ar_step].all()):
                        ar_step += 1  # a step whose patches are all given calls no lower level
                    todo = ~full[:, ar_step] if full is not None else torch.ones(n, dtype=torch.bool)
                    to_pred[todo, ar_step] = True
                    ar_step += 1
                sub = [(regions[j][0], regions[j][1] + (q // g) * p, regions[j][2] + (q % g) * p)
                       for j, q in to_pred.nonzero().tolist()]  # fmt: skip
                if level + 1 < n_levels:
                    parse(level + 1, sub)
                ev = events[pos]
                assert ev[0] == "done" and ev[1] == level, ev[:2]
                pos += 1
                paint(ev[2], sub, p)
                if level == n_levels - 1:
                    emitted += 1
                    if emitted % keep_every == 0:
                        frames.append(canvas.clone())

        while pos < len(events):
            parse(0, [(b, 0, 0) for b in range(B)])
        frames.append(final.float().cpu().clone())
        return frames + [frames[-1]] * hold


def write_gif(frames: list[Any], path: str | os.PathLike[str], *, ncols: int | None = None, scale: int = 1,
              fps: float = 12.0) -> Path:  # fmt: skip
    """Frames (each (B, 3, S, S) in [0, 1]) -> an animated GIF of their grids, looping."""
    from PIL import Image  # deferred: heavy import

    images = []
    for frame in frames:
        grid = to_uint8_hwc(make_grid(frame, ncols))
        img = Image.fromarray(grid)
        if scale > 1:
            img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
        images.append(img)
    path = Path(path)
    images[0].save(path, save_all=True, append_images=images[1:], duration=max(20, int(1000 / fps)), loop=0)
    return path


# ------------------------------------------------------------------------------------ the command
def check_output_folder(out: Path) -> None:
    """``out`` is a folder or could be created as one; ``CLIError`` before any sampling otherwise."""
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise CLIError(f"--out {out}: exists and is not a folder")
        target = out
    else:
        target = out.absolute().parent
        while not target.exists():
            target = target.parent
        if not target.is_dir():
            raise CLIError(f"--out {out}: {target} is not a folder")
    if not os.access(target, os.W_OK | os.X_OK):
        raise CLIError(f"--out {out}: {target} is not writable")


class OutputFolder:
    """The output folder, created only when there is something to write.

    ``path(name)`` gives the path of a file to write (creating the folder at the first call); if the
    ``with`` block fails, the files and folders this run created are removed again (files that were
    there before are left alone).
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.new_folders: list[Path] = []  # outermost first
        self.new_files: list[Path] = []

    def path(self, name: str) -> Path:
        if not self.folder.is_dir():
            missing, parent = [], self.folder
            while not parent.exists():
                missing.append(parent)
                parent = parent.parent
            self.folder.mkdir(parents=True, exist_ok=True)
            self.new_folders = missing[::-1]
        path = self.folder / name
        if not path.exists():
            self.new_files.append(path)
        return path

    def __enter__(self) -> OutputFolder:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        if exc_type is None:
            return
        for path in self.new_files:
            path.unlink(missing_ok=True)
        for folder in reversed(self.new_folders):
            try:
                folder.rmdir()  # only when empty: never anything another process put there
            except OSError:
                break


def run_sample(args: argparse.Namespace) -> int:
    import torch  # deferred: heavy import

    from fractalgen.models import CheckpointError  # deferred: heavy import
    from fractalgen.platform.generation.sampling import (  # deferred: heavy import
        balanced_labels,
        generate_images,
        load_model,
        pick_device,
        sample_batch,
    )
    from fractalgen.platform.generation.sources import resolve_model_source  # deferred: heavy import

    out = Path(args.out)
    check_output_folder(out)  # created when the images are there (a failed run leaves no folder)
    work = tempfile.mkdtemp(prefix="fractalgen-sample-")  # downloaded / exported weights
    atexit.register(shutil.rmtree, work, ignore_errors=True)
    try:
        source = resolve_model_source(args.model, work_dir=work)
        device = pick_device(args.device)
        model = load_model(source.path, device)
    except (FileNotFoundError, ValueError, CheckpointError) as err:
        raise CLIError(str(err)) from None
    cfg = model.config
    settings = settings_from_args(args, source)
    labels = parse_labels(args.labels, cfg)
    if labels:
        label_t = torch.tensor(labels, dtype=torch.long).repeat_interleave(args.per_label)
    else:
        label_t = balanced_labels(args.num_images, cfg.num_classes)
    n = label_t.numel()
    if n == 0:
        raise CLIError("nothing to sample: give --labels or --num-images > 0")
    S = cfg.img_size

    known = known_mask = image = keep = None
    if args.input or args.mask or args.region:
        if not args.input:
            raise CLIError("--mask / --region need --input IMAGE (the pixels to keep)")
        if bool(args.mask) == bool(args.region):
            raise CLIError("give exactly one of --mask MASK_IMAGE or --region {" + ",".join(REGIONS) + "}")
        image = load_input_image(args.input, S)
        keep = load_mask_image(args.mask, S) if args.mask else region_mask(args.region, S)
        known = image.unsqueeze(0).expand(n, -1, -1, -1).contiguous()
        known_mask = keep.unsqueeze(0).expand(n, -1, -1).contiguous()

    resolved = settings.resolved(cfg)
    print(f"sampling {n} image(s) of {S}x{S} from {args.model}: {resolved.describe()}, seed {args.seed}")
    frames = None
    try:
        if args.animate:
            recorder = GenerationRecorder(model)
            recorder.known, recorder.known_mask = known, known_mask
            with recorder:
                images = sample_batch(model, label_t, settings, args.seed, known=known, known_mask=known_mask)
            frames = recorder.frames(images, max_frames=args.animate_frames)
        else:
            images = generate_images(
                model, label_t, settings, batch_size=args.batch_size, seed=args.seed, progress=not args.quiet,
                known=known, known_mask=known_mask,
            )  # fmt: skip
    except ValueError as err:
        raise CLIError(str(err)) from None

    record = {
        "model": args.model,
        "registered": {"name": source.registered_name, "version": source.version}
        if source.registered_name
        else None,
        "labels": label_t.tolist(),
        "class_names": [cfg.class_names[i] for i in label_t.tolist()] if cfg.class_names else None,
        "settings": {k.split(".", 1)[1]: v for k, v in resolved.to_tags().items()},
        "seed": args.seed,
        "batch_size": n if args.animate else args.batch_size,
        "inpainting": bool(known is not None),
    }
    try:
        with OutputFolder(out) as folder:
            if known is not None:
                save_png(image, folder.path("input.png"))
                save_png(torch.where(keep, 0.0, 1.0).expand(3, -1, -1), folder.path("mask.png"))
            if frames is not None:
                gif = write_gif(frames, folder.path("generation.gif"), ncols=args.grid_cols,
                                scale=auto_scale(S), fps=args.fps)  # fmt: skip
                print(f"wrote {gif} ({len(frames)} frames; all {n} images sampled as one batch with "
                      f"seed {args.seed})")  # fmt: skip
            for i, (img, lab) in enumerate(zip(images, label_t.tolist())):
                save_png(img, folder.path(f"{i:05d}_class{lab}.png"))
            grid_scale = args.grid_scale or auto_scale(S)
            save_png(make_grid(images, args.grid_cols), folder.path("grid.png"), scale=grid_scale)
            folder.path("sample.json").write_text(json.dumps(record, indent=2))
    except OSError as err:
        raise CLIError(f"--out {out}: cannot write: {err}") from None
    print(f"wrote {n} PNG(s), {out / 'grid.png'} and {out / 'sample.json'}")
    return 0


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "sample",
        help="generate images (PNGs, a grid, optionally the generation process as a GIF)",
        description=(
            "Generate class-conditional images from MODEL: a registered version (models:/NAME/VERSION, "
            "models:/NAME@champion), a released-format checkpoint file (local or s3://) or a training "
            "checkpoint / run folder. Batch i is sampled with seed SEED+i, so a run is reproducible. "
            "Temperature multiplies the logits (released meaning: > 1 sharpens)."
        ),
    )
    p.add_argument(
        "--model",
        required=True,
        help="models:/NAME@ALIAS, models:/NAME/VERSION, a .pth file or a checkpoint folder",
    )
    p.add_argument("--out", default="samples", help="output folder (default: samples)")
    p.add_argument(
        "--labels", help="class indices or names, comma-separated (default: balanced over all classes)"
    )
    p.add_argument("--per-label", type=int, default=1, help="images per given label (default 1)")
    p.add_argument(
        "--num-images", type=int, default=16, help="images when --labels is not given (default 16)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", help="cuda, cuda:1, cpu (default: cuda when available)")
    p.add_argument("--grid-cols", type=int, help="images per grid row (default: square)")
    p.add_argument("--grid-scale", type=int, help="grid upscale factor (default: to >= 128 px per image)")
    add_sampling_args(p)
    a = p.add_argument_group("generation process")
    a.add_argument(
        "--animate", action="store_true", help="also write generation.gif (one batch, pixel by pixel)"
    )
    a.add_argument("--animate-frames", type=int, default=120, help="at most this many frames (default 120)")
    a.add_argument("--fps", type=positive_float, default=12.0, help="GIF frames per second (default 12)")
    i = p.add_argument_group("inpainting / outpainting (paper section 5.3)")
    i.add_argument("--input", help="image whose pixels are kept (ADM centre-cropped to the model size)")
    i.add_argument("--mask", help="mask image: white = generate, black = keep")
    i.add_argument("--region", choices=REGIONS, help="generate this region instead of giving --mask")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run_sample)
