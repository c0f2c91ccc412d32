"""A sweep's results: the table (one row per trial), the Pareto fronts, the plots and the summary text."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fractalgen.platform.tuning.config import SweepConfig, schedule_family
from fractalgen.platform.tuning.space import trial_settings
from fractalgen.sampling_settings import SamplingSettings

log = logging.getLogger(__name__)


@dataclass
class SweepResult:
    best: dict[str, Any] | None  # the best completed trial's row (settings + metrics), None if none
    table: Path  # Parquet
    plot: Path | None
    parent_run_id: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    registered: tuple[str, str] | None = None  # (name, version) tagged with the best setting
    pareto: list[dict[str, Any]] = field(default_factory=list)  # rows of pareto_rows (with "front")
    pareto_table: Path | None = None  # Parquet; pareto.md beside it
    pareto_plot: Path | None = None

    @property
    def best_settings(self) -> SamplingSettings | None:
        return trial_settings(self.best) if self.best else None

    @property
    def released(self) -> dict[str, Any] | None:
        """The released setting's row, None when it was not evaluated."""
        return next((r for r in self.rows if r.get("released")), None)


def _float(value: Any) -> float:
    return float(value) if value is not None else float("nan")


def result_rows(results: Any, cfg: SweepConfig) -> list[dict[str, Any]]:
    rows = []
    for res in results:
        conf = res.config or {}
        m = res.metrics or {}
        if not conf:
            continue
        settings = trial_settings(conf)
        row = {
            "trial_id": m.get("trial_id") or (res.path or "").rsplit("/", 1)[-1],
            "released": bool(conf.get("released", False)),
            "cfg": float(conf["cfg"]),
            "temperature": float(conf["temperature"]),
            "cfg_schedule": str(settings.cfg_schedule),
            "schedule_family": schedule_family(str(settings.cfg_schedule)),
            "num_iters": str(conf.get("num_iters", "default")),
            "lower_cfg": settings.lower_cfg,
            "lower_cfg_schedule": None
            if settings.lower_cfg_schedule is None
            else str(settings.lower_cfg_schedule),
            "temperature_end": settings.temperature_end,
            "filter_threshold": settings.filter_threshold,
            "num_images": int(m.get("num_images", 0) or 0),
            "fid": _float(m.get("fid")),
            "inception_score": _float(m.get("inception_score")),
            "precision": _float(m.get("precision")),
            "recall": _float(m.get("recall")),
            "sample_seconds_per_image": _float(m.get("sample_seconds_per_image")),
            "completed": bool(m.get("completed", False))
            and int(m.get("num_images", 0) or 0) >= cfg.eval.num_images,
            "error": str(res.error).splitlines()[0][:300] if res.error else "",
            "mlflow_run_id": str(m.get("mlflow_run_id", "")),
        }
        row["status"] = "completed" if row["completed"] else ("error" if row["error"] else "early-stopped")
        rows.append(row)
    return rows


TABLE_COLUMNS = [
    "trial_id", "released", "cfg", "temperature", "cfg_schedule", "schedule_family", "num_iters", "lower_cfg",
    "lower_cfg_schedule", "temperature_end", "filter_threshold", "num_images", "fid", "inception_score",
    "precision", "recall", "sample_seconds_per_image", "status", "mlflow_run_id", "error",
]  # fmt: skip


def write_table(rows: list[dict[str, Any]], path: Path, columns: Sequence[str] = ()) -> Path:
    """The results table as Parquet (one row per trial; ``columns`` default: ``TABLE_COLUMNS``)."""
    import pyarrow as pa  # deferred: heavy import
    import pyarrow.parquet as pq  # deferred: heavy import

    path.parent.mkdir(parents=True, exist_ok=True)
    columns = list(columns or TABLE_COLUMNS)
    table = pa.table({c: [r.get(c) for r in rows] for c in columns})
    pq.write_table(table, path)
    return path


# =============================================================================== Pareto front
# (objective column, its label); FID is always the other objective (lower is better), these higher
PARETO_PAIRS = (("inception_score", "IS"), ("precision", "precision"), ("recall", "recall"))


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices (ascending) of the points no other point dominates, the first coordinate minimised
    and the second maximised: ``q`` dominates ``p`` when ``q0 <= p0`` and ``q1 >= p1`` with one
    strict. Equal points are all kept. Non-finite points are left out. O(n log n)."""
    finite = [i for i, (a, b) in enumerate(points) if math.isfinite(a) and math.isfinite(b)]
    order = sorted(finite, key=lambda i: (points[i][0], -points[i][1]))
    keep: list[int] = []
    best_b, best_a = -math.inf, math.inf  # the highest second coordinate so far, and its lowest first
    for i in order:
        a, b = points[i]
        if b > best_b:
            keep.append(i)
            best_b, best_a = b, a
        elif b == best_b and a == best_a:  # a duplicate of a kept point
            keep.append(i)
    return sorted(keep)


def pareto_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The completed trials on the Pareto front of FID (lower) against IS, precision and recall
    (higher; a pair only when some trial has the metric), one row per (front, trial) with ``front``
    (``fid-inception_score`` ...), sorted by front, then FID."""
    done = [r for r in rows if r["status"] == "completed"]
    out: list[dict[str, Any]] = []
    for metric, _ in PARETO_PAIRS:
        if not any(math.isfinite(r.get(metric, math.nan)) for r in done):
            continue
        front = pareto_front([(r["fid"], r.get(metric, math.nan)) for r in done])
        out += sorted(({**done[i], "front": f"fid-{metric}"} for i in front), key=lambda r: r["fid"])
    return out


PARETO_COLUMNS = [
    "front", "trial_id", "released", "cfg_schedule", "cfg", "temperature", "num_iters", "lower_cfg",
    "lower_cfg_schedule", "temperature_end", "filter_threshold", "fid", "inception_score", "precision",
    "recall", "sample_seconds_per_image", "num_images", "mlflow_run_id",
]  # fmt: skip


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, bool):
        return "yes" if value else ""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def write_pareto_markdown(pareto: Sequence[dict[str, Any]], path: Path, *, title: str = "") -> Path:
    """``pareto_rows`` as markdown: one table per front."""
    cols = [c for c in PARETO_COLUMNS if c not in ("front", "mlflow_run_id")]
    lines = [f"# {title or 'Pareto-optimal sampling settings'}", ""]
    if not pareto:
        lines.append("No completed trial: no Pareto front.")
    for front in dict.fromkeys(r["front"] for r in pareto):
        metric = front.split("-", 1)[1]
        lines += [f"## FID (lower) against {dict(PARETO_PAIRS)[metric]} (higher)", "",
                  "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]  # fmt: skip
        lines += [
            "| " + " | ".join(_cell(r.get(c)) for c in cols) + " |" for r in pareto if r["front"] == front
        ]
        lines.append("")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
    return path


# one marker and colour per schedule family (fractalgen/sampling_settings.py SCHEDULES)
FAMILY_STYLE = {
    "linear": ("o", "tab:blue"), "constant": ("s", "tab:orange"), "cosine": ("^", "tab:green"),
    "power-cosine": ("D", "tab:purple"), "interval": ("v", "tab:red"),
}  # fmt: skip


def plot_pareto(rows: list[dict[str, Any]], path: Path, *, title: str = "") -> Path | None:
    """FID against IS (and precision, recall when computed) of the completed trials: one marker and
    colour per schedule family, the Pareto front as a dashed line, the released setting starred."""
    import matplotlib  # deferred: heavy import

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # deferred: heavy import

    done = [r for r in rows if r["status"] == "completed" and math.isfinite(r["fid"])]
    pairs = [(m, label) for m, label in PARETO_PAIRS if any(math.isfinite(r.get(m, math.nan)) for r in done)]
    if not pairs:
        return None
    fig, axes = plt.subplots(1, len(pairs), figsize=(5.2 * len(pairs), 4.4), squeeze=False)
    for ax, (metric, label) in zip(axes[0], pairs):
        pts = [r for r in done if math.isfinite(r.get(metric, math.nan))]
        for family in dict.fromkeys(r["schedule_family"] for r in pts):
            marker, colour = FAMILY_STYLE.get(family, ("x", "tab:grey"))
            mine = [r for r in pts if r["schedule_family"] == family]
            ax.scatter([r[metric] for r in mine], [r["fid"] for r in mine], marker=marker, color=colour,
                       label=family, alpha=0.85, zorder=3)  # fmt: skip
        front = sorted(
            (pts[i] for i in pareto_front([(r["fid"], r[metric]) for r in pts])), key=lambda r: r[metric]
        )
        ax.plot(
            [r[metric] for r in front], [r["fid"] for r in front], "k--", lw=1, label="Pareto front", zorder=2
        )
        for r in (r for r in pts if r.get("released")):
            ax.scatter([r[metric]], [r["fid"]], marker="*", s=260, facecolors="none", edgecolors="black",
                       linewidths=1.4, label="released setting", zorder=4)  # fmt: skip
            ax.annotate(
                "released", (r[metric], r["fid"]), textcoords="offset points", xytext=(8, 6), fontsize=8
            )
        ax.set_xlabel(f"{label} (higher is better)")
        ax.set_ylabel(f"FID ({max(r['num_images'] for r in pts)} images, lower is better)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title or "Pareto front of the completed trials")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_fid_vs_cfg(rows: list[dict[str, Any]], path: Path, *, title: str = "") -> Path | None:
    """FID against guidance scale, one line per temperature (and per schedule / iterations when
    several were searched); completed trials as lines, early-stopped ones as faint crosses."""
    import matplotlib  # deferred: heavy import

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # deferred: heavy import

    done = [r for r in rows if r["status"] == "completed"]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    multi = len({(r["cfg_schedule"], r["num_iters"], _extras(r)) for r in rows}) > 1
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in done:  # one line per setting other than cfg (the released trial's row too)
        groups.setdefault((r["temperature"], r["cfg_schedule"], r["num_iters"], _extras(r)), []).append(r)
    for (temp, sched, iters, extras), items in sorted(groups.items()):
        items.sort(key=lambda r: r["cfg"])
        label = (
            f"t={temp:g}" + (f", {sched}, iters {iters}" if multi else "") + (f", {extras}" if extras else "")
        )
        ax.plot([r["cfg"] for r in items], [r["fid"] for r in items], marker="o", label=label)
    stopped = [r for r in rows if r["status"] == "early-stopped" and r["fid"] == r["fid"]]
    if stopped:
        ax.scatter([r["cfg"] for r in stopped], [r["fid"] for r in stopped], marker="x", alpha=0.4,
                   color="grey", label="early-stopped (FID at fewer images)")  # fmt: skip
    ax.set_xlabel("guidance scale (cfg)")
    ax.set_ylabel(f"FID ({max((r['num_images'] for r in done), default=0)} images)")
    ax.set_title(title or "FID against guidance scale per temperature")
    ax.grid(alpha=0.3)
    if groups or stopped:
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _extras(r: dict[str, Any]) -> str:
    """The row's optional settings that are set, compactly (``lower_cfg=2, t_end=1.2``)."""
    out = []
    for key, short in (("lower_cfg", "lower_cfg"), ("lower_cfg_schedule", "lower_sched"),
                       ("temperature_end", "t_end"), ("filter_threshold", "filter")):  # fmt: skip
        value = r.get(key)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            continue
        if key == "filter_threshold" and value == SamplingSettings.filter_threshold:
            continue
        out.append(f"{short}={value:g}" if isinstance(value, float) else f"{short}={value}")
    return ", ".join(out)


def describe_result(result: SweepResult) -> str:
    rows = result.rows
    lines = [f"{len(rows)} trials ({sum(r['status'] == 'completed' for r in rows)} completed, "
             f"{sum(r['status'] == 'early-stopped' for r in rows)} early-stopped); * = the released setting"]  # fmt: skip
    width = max([len("schedule"), *(len(r["cfg_schedule"]) for r in rows)])
    header = (f"  {'cfg':>6} {'temp':>6} {'schedule':<{width}} {'iters':>9} {'images':>7} {'FID':>10} {'IS':>7} "
              f"{'s/img':>8}  status")  # fmt: skip
    lines.append(header)
    for r in sorted(rows, key=lambda r: (r["status"] != "completed", r["fid"])):
        extras = _extras(r)
        lines.append(f"{'*' if r.get('released') else ' '} {r['cfg']:>6g} {r['temperature']:>6g} "
                     f"{r['cfg_schedule']:<{width}} {r['num_iters']:>9} {r['num_images']:>7} {r['fid']:>10.3f} "
                     f"{r['inception_score']:>7.3f} {r.get('sample_seconds_per_image', math.nan):>8.4f}  "
                     f"{r['status']}" + (f"  ({extras})" if extras else ""))  # fmt: skip
    for front in dict.fromkeys(r["front"] for r in result.pareto):
        metric = front.split("-", 1)[1]
        lines.append(f"Pareto front, FID (lower) against {dict(PARETO_PAIRS)[metric]} (higher):")
        for r in (r for r in result.pareto if r["front"] == front):
            extras = _extras(r)
            lines.append(f"  {'*' if r.get('released') else ' '} FID {r['fid']:.4f}  {metric} {r[metric]:.4f}  "
                         f"{r['sample_seconds_per_image']:.4f} s/img  cfg {r['cfg']:g}, t {r['temperature']:g}, "
                         f"{r['cfg_schedule']}, iters {r['num_iters']}" + (f", {extras}" if extras else ""))  # fmt: skip
    released = result.released
    if released is not None and released["status"] == "completed":
        lines.append(f"released setting: FID {released['fid']:.4f}, IS {released['inception_score']:.4f}")
    if result.best:
        lines.append(f"best: {result.best_settings.describe()} -> FID {result.best['fid']:.4f}"
                     + (" (the released setting)" if result.best.get("released") else ""))  # fmt: skip
    if result.registered:
        lines.append(f"tagged {result.registered[0]} version {result.registered[1]} with the best setting")
    lines.append(f"table: {result.table}" + (f"   plot: {result.plot}" if result.plot else ""))
    if result.pareto_table:
        lines.append(f"Pareto: {result.pareto_table}, {result.pareto_table.with_suffix('.md')}"
                     + (f", {result.pareto_plot}" if result.pareto_plot else ""))  # fmt: skip
    lines.append(f"MLflow parent run: {result.parent_run_id}")
    return "\n".join(lines)
