"""Reviewing and promoting versions: side-by-side comparisons (terminal, HTML) of the versions' tags
and grids, and moving the ``champion`` alias (docs in ``fractalgen.platform.registry.versions``)."""

from __future__ import annotations

import base64
import contextlib
import html
import logging
import os
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fractalgen.platform.artifacts.model_store import (
    _versions,
    client,
    get_version,
)
from fractalgen.platform.registry.versions import (
    CHAMPION,
    LOWER_IS_BETTER,
    METRIC_PREFIX,
    REVIEW_METRICS,
    SWEEP_PREFIX,
    TAG_ARCH,
    TAG_GRID,
    TAG_PROMOTED,
    TAG_SOURCE,
    TAG_TRAINING_RUN,
)
from fractalgen.sampling_settings import TAG_PREFIX as SAMPLING_PREFIX
from fractalgen.sampling_settings import SamplingSettings

log = logging.getLogger(__name__)


@dataclass
class VersionSummary:
    version: str
    aliases: list[str]
    created: str
    run_id: str | None
    tags: dict[str, str]
    grid_file: Path | None = None
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def best_settings(self) -> str:
        """The sweep's best setting, ``-`` when no sweep tagged the version (``to_tags`` always holds
        ``filter_threshold``, so an unswept version is told by its tags, not by the settings)."""
        if not any(k.startswith(SAMPLING_PREFIX) for k in self.tags):
            return "-"
        return SamplingSettings.from_tags(self.tags).describe()


def collect_versions(
    name: str, versions: Sequence[str] | None = None, *, download_to: str | os.PathLike[str] | None = None,
    tracking_uri: str | None = None,
) -> list[VersionSummary]:  # fmt: skip
    """Summaries of ``versions`` (default: all) of ``name``; grids downloaded into ``download_to``."""
    c = client(tracking_uri)
    all_versions = _versions(c, name)
    if versions:
        wanted = [get_version(name, v, c=c) for v in versions]
    else:
        wanted = [c.get_model_version(name, v.version) for v in all_versions]
    out = []
    for mv in wanted:
        tags = dict(mv.tags or {})
        metrics = {}
        for key, value in tags.items():
            if key.startswith(METRIC_PREFIX) and key != f"{METRIC_PREFIX}settings":
                with contextlib.suppress(ValueError):
                    metrics[key[len(METRIC_PREFIX) :]] = float(value)
        summary = VersionSummary(
            version=str(mv.version),
            aliases=sorted(mv.aliases or []),
            created=time.strftime("%Y-%m-%d %H:%M", time.localtime(mv.creation_timestamp / 1000)),
            run_id=mv.run_id,
            tags=tags,
            metrics=metrics,
        )
        if download_to is not None and tags.get(TAG_GRID) and mv.run_id:
            dest = Path(download_to) / f"v{mv.version}"
            dest.mkdir(parents=True, exist_ok=True)
            try:
                summary.grid_file = Path(c.download_artifacts(mv.run_id, tags[TAG_GRID], str(dest)))
            except Exception as err:
                log.warning("no grid for version %s: %s", mv.version, err)
        out.append(summary)
    return out


def _best(summaries: Sequence[VersionSummary], key: str) -> str | None:
    values = [(s.metrics[key], s.version) for s in summaries if key in s.metrics]
    if len(values) < 2:
        return None
    return (min(values) if LOWER_IS_BETTER.get(key, True) else max(values))[1]


def comparison_rows(summaries: Sequence[VersionSummary]) -> list[tuple[str, list[str]]]:
    """Rows (label, one cell per version) of the side-by-side comparison; ``*`` marks the best value."""
    rows: list[tuple[str, list[str]]] = [
        ("aliases", [", ".join(s.aliases) or "-" for s in summaries]),
        ("created", [s.created for s in summaries]),
        ("architecture", [s.tags.get(TAG_ARCH, "-") for s in summaries]),
        ("source", [_short(s.tags.get(TAG_SOURCE, "-")) for s in summaries]),
    ]
    keys = [k for k in REVIEW_METRICS if any(k in s.metrics for s in summaries)]
    keys += sorted({k for s in summaries for k in s.metrics} - set(keys))
    for key in keys:
        best = _best(summaries, key)
        cells = []
        for s in summaries:
            if key in s.metrics:
                cells.append(f"{s.metrics[key]:.4g}" + (" *" if s.version == best else ""))
            else:
                cells.append("-")
        rows.append((key + (" (lower is better)" if LOWER_IS_BETTER.get(key) else ""), cells))
    rows.append(("metrics measured with", [s.tags.get(f"{METRIC_PREFIX}settings", "-") for s in summaries]))
    rows.append(("best sampling (sweep)", [s.best_settings for s in summaries]))
    rows.append(("sweep FID", [s.tags.get(f"{SWEEP_PREFIX}fid", "-") for s in summaries]))
    rows.append(("training run", [s.tags.get(TAG_TRAINING_RUN, "-") for s in summaries]))
    rows.append(("registration run", [s.run_id or "-" for s in summaries]))
    return rows


def _short(text: str, width: int = 40) -> str:
    return text if len(text) <= width else "..." + text[-(width - 3) :]


def _wrap(text: str, width: int) -> list[str]:
    return textwrap.wrap(text, width) or [""]


def render_terminal(
    name: str, summaries: Sequence[VersionSummary], *, thumbnails: bool = False, width: int = 34
) -> str:
    """The comparison as a text table, one column per version (optionally ANSI colour thumbnails)."""
    label_w = max(len(r[0]) for r in comparison_rows(summaries)) if summaries else 10
    header = [f"version {s.version}" for s in summaries]
    lines = [f"registered model {name}: {len(summaries)} version(s)", ""]
    lines.append(" " * label_w + " | " + " | ".join(h.ljust(width) for h in header))
    lines.append("-" * label_w + "-+-" + "-+-".join("-" * width for _ in header))
    for label, cells in comparison_rows(summaries):
        wrapped = [_wrap(c, width) for c in cells]
        for i in range(max(len(w) for w in wrapped)):
            left = label if i == 0 else ""
            lines.append(
                left.ljust(label_w)
                + " | "
                + " | ".join((w[i] if i < len(w) else "").ljust(width) for w in wrapped)
            )
    grid_cells = [f"runs:/{s.run_id}/{s.tags[TAG_GRID]}" if s.tags.get(TAG_GRID) and s.run_id else "-"
                  for s in summaries]  # fmt: skip
    parts = [_wrap(c, width) for c in grid_cells]
    for i in range(max(len(p) for p in parts) if parts else 0):
        label = "sample grid" if i == 0 else ""
        cells = " | ".join((p[i] if i < len(p) else "").ljust(width) for p in parts)
        lines.append(label.ljust(label_w) + " | " + cells)
    if thumbnails and any(s.grid_file for s in summaries):
        blocks = [_ansi_thumbnail(s.grid_file, width) if s.grid_file else [] for s in summaries]
        for i in range(max(len(b) for b in blocks)):
            row = []
            for b in blocks:
                row.append(b[i] if i < len(b) else " " * width)
            lines.append(" " * label_w + " | " + " | ".join(row))
    return "\n".join(lines)


def _ansi_thumbnail(path: Path, width: int) -> list[str]:
    """An image as lines of '▀' characters in 24-bit colour (two pixel rows per line)."""
    from PIL import Image  # deferred: heavy import

    img = Image.open(path).convert("RGB")
    h = max(2, round(img.height * width / img.width))
    h += h % 2
    px = img.resize((width, h), Image.BOX).load()
    lines = []
    for y in range(0, h, 2):
        parts = []
        for x in range(width):
            (r1, g1, b1), (r2, g2, b2) = px[x, y], px[x, y + 1]
            parts.append(f"\x1b[38;2;{r1};{g1};{b1}m\x1b[48;2;{r2};{g2};{b2}m\u2580")
        lines.append("".join(parts) + "\x1b[0m")
    return lines


def render_html(name: str, summaries: Sequence[VersionSummary]) -> str:
    """A self-contained HTML report: the comparison table and the grids (embedded)."""
    e = html.escape
    head = "".join(f"<th>version {e(s.version)}</th>" for s in summaries)
    body = []
    for label, cells in comparison_rows(summaries):
        tds = "".join(f"<td{' class=best' if c.endswith(' *') else ''}>{e(c)}</td>" for c in cells)
        body.append(f"<tr><th>{e(label)}</th>{tds}</tr>")
    imgs = []
    for s in summaries:
        if s.grid_file and Path(s.grid_file).is_file():
            data = base64.b64encode(Path(s.grid_file).read_bytes()).decode("ascii")
            imgs.append(
                f'<td><img alt="samples of version {e(s.version)}" src="data:image/png;base64,{data}"></td>'
            )
        else:
            imgs.append("<td>-</td>")
    body.append(f"<tr><th>sample grid</th>{''.join(imgs)}</tr>")
    style = (
        "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}td,th{border:1px solid #ccc;"
        "padding:4px 8px;text-align:left;vertical-align:top}td.best{font-weight:bold;background:#e8f5e9}"
        "img{max-width:420px;image-rendering:pixelated}"
    )
    return (
        f"<!doctype html><html><head><meta charset=utf-8><title>{e(name)}: model versions</title>"
        f"<style>{style}</style></head><body><h1>{e(name)}</h1>"
        f"<p>Generated {e(time.strftime('%Y-%m-%d %H:%M'))}. * marks the best value of a metric.</p>"
        f"<table><tr><th></th>{head}</tr>{''.join(body)}</table></body></html>"
    )


def review(
    name: str, *, versions: Sequence[str] | None = None, html_path: str | os.PathLike[str] | None = None,
    thumbnails: bool = False, tracking_uri: str | None = None, out: Any = None,
) -> list[VersionSummary]:  # fmt: skip
    """Print the side-by-side comparison of ``name``'s versions; write the HTML report if asked."""
    out = out or sys.stdout
    with tempfile.TemporaryDirectory(prefix="fractalgen-review-") as tmp:
        summaries = collect_versions(name, versions, download_to=tmp, tracking_uri=tracking_uri)
        print(render_terminal(name, summaries, thumbnails=thumbnails), file=out)
        if html_path:
            Path(html_path).parent.mkdir(parents=True, exist_ok=True)
            Path(html_path).write_text(render_html(name, summaries))
            print(f"wrote {html_path}", file=out)
    return summaries


def promote(
    name: str, version: str | int, *, alias: str = CHAMPION, yes: bool = True,
    confirm: Callable[[str], bool] | None = None, tracking_uri: str | None = None, out: Any = None,
) -> str | None:  # fmt: skip
    """Show the comparison of ``version`` with the current holder of ``alias``, then move ``alias``
    to ``version``. Returns the previous holder's version (None if none). ``RegistryError`` for an
    unknown model or version; nothing changes when ``confirm`` answers no."""
    from mlflow.exceptions import MlflowException  # deferred: heavy import

    out = out or sys.stdout
    c = client(tracking_uri)
    target = get_version(name, version, c=c)
    try:
        previous = str(c.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        previous = None
    shown = [v for v in dict.fromkeys([previous, str(target.version)]) if v is not None]
    review(name, versions=shown, tracking_uri=tracking_uri, out=out)
    if previous == str(target.version):
        print(f"version {target.version} already holds @{alias}", file=out)
        return previous
    question = f"move @{alias} of {name} from {previous or 'no version'} to version {target.version}?"
    if not yes and confirm is not None and not confirm(question):
        print("not promoted", file=out)
        return previous
    c.set_registered_model_alias(name, alias, target.version)
    c.set_model_version_tag(name, target.version, TAG_PROMOTED, time.strftime("%Y-%m-%dT%H:%M:%S"))
    if previous:
        c.set_model_version_tag(name, previous, "fractalgen.replaced_by", str(target.version))
    print(f"@{alias} of {name}: version {previous or '-'} -> version {target.version}", file=out)
    return previous


# ------------------------------------------------------------------------------ CLI
