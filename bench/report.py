"""The benchmark rows against the targets, as the Markdown table of docs/performance.md#status.

Reads the ``JSON {...}`` lines of ``bench.train`` / ``bench.sample`` (a saved log, a results.jsonl
with or without the prefix, or stdin) and prints one table row per result: what was measured, the
reference figure, the target, ours, and whether the target is met (memory targets are for an 80 GB
H100: a row measured on a larger GPU meets "fits" only if its peak stays under 80 GiB).

    python -m bench.report bench-out/results.jsonl
    python -m bench.train ... | python -m bench.report
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Target:
    bench: str
    config: str
    batch: int
    reference: str
    min_img_per_s: float | None = None  # training
    max_s_per_img: float | None = None  # sampling
    max_gib: float | None = None

    def text(self) -> str:
        parts = []
        if self.min_img_per_s is not None:
            parts.append(f">= {self.min_img_per_s:g} img/s")
        if self.max_s_per_img is not None:
            parts.append(f"<= {self.max_s_per_img:g} s/img")
        if self.max_gib is not None:
            parts.insert(0, f"fits {self.max_gib:g} GB")
        return ", ".join(parts)


# docs/performance.md#status (one H100, bf16, the reference rows' settings)
TARGETS = (
    Target("train", "fractalmar_in64", 64, "67.7 img/s (act. ckpt)", min_img_per_s=270),
    Target("train", "fractalmar_base_in256", 32, "32.2 img/s", min_img_per_s=130),
    Target("train", "fractalmar_large_in256", 32, "21.7 img/s", min_img_per_s=90),
    Target("train", "fractalmar_huge_in256", 32, "out of memory", min_img_per_s=45, max_gib=80),
    Target("sample", "fractalmar_in64", 128, "0.394 s/img", max_s_per_img=0.08),
    Target("sample", "fractalmar_base_in256", 32, "7.16 s/img", max_s_per_img=1.0),
)


def read_rows(lines: Iterable[str]) -> list[dict]:
    """The result rows among ``lines`` (``JSON {...}`` lines or bare JSON objects; others skipped)."""
    rows = []
    for line in lines:
        line = line.strip()
        if line.startswith("JSON "):
            line = line[5:]
        if not line.startswith("{"):
            continue
        row = json.loads(line)
        if "bench" in row and "config" in row:
            rows.append(row)
    return rows


def verdict(row: dict, target: Target | None) -> str:
    if row.get("status") != "ok":
        return f"no ({row.get('status')})"
    if target is None:
        return "-"
    ok = True
    if target.min_img_per_s is not None:
        ok &= (row.get("img_per_s") or 0.0) >= target.min_img_per_s
    if target.max_s_per_img is not None:
        ok &= (row.get("s_per_img") or float("inf")) <= target.max_s_per_img
    if target.max_gib is not None:
        peak = row.get("peak_gib")
        ok &= peak is not None and peak <= target.max_gib
    return "yes" if ok else "no"


def ours(row: dict) -> str:
    if row.get("status") != "ok":
        return str(row.get("status"))
    if row["bench"] == "sample":
        text = f"{row['s_per_img']:.3f} s/img"
    else:
        text = f"{row['img_per_s']:.1f} img/s"
    if row.get("peak_gib") is not None:
        text += f", {row['peak_gib']:.1f} GiB"
    if row.get("mfu") is not None:
        text += f", MFU {100 * row['mfu']:.1f}%"
    profile = (row.get("extra") or {}).get("profile") or {}
    if profile.get("device_busy") is not None:
        text += f", GPU busy {100 * profile['device_busy']:.0f}%"
    return text


def table(rows: list[dict]) -> str:
    lines = [
        "| what | setting | device | reference | target | ours | met |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        target = next(
            (
                t
                for t in TARGETS
                if (t.bench, t.config, t.batch) == (row["bench"], row["config"], row["batch"])
            ),
            None,
        )
        what = f"{row['bench']} {row['config']}, {'micro-batch' if row['bench'] == 'train' else 'batch'} {row['batch']}"
        lines.append(
            f"| {what} | {row.get('setting', '')} | {row.get('device', '')} | "
            f"{target.reference if target else '-'} | {target.text() if target else '-'} | {ours(row)} | "
            f"{verdict(row, target)} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="*", help="logs or JSON-lines files (default: stdin)")
    args = p.parse_args(argv)
    lines: list[str] = []
    if args.files:
        for path in args.files:
            with open(path) as f:
                lines.extend(f)
    else:
        lines.extend(sys.stdin)
    rows = read_rows(lines)
    if not rows:
        print("no benchmark rows (JSON lines of bench.train / bench.sample) in the input", file=sys.stderr)
        return 1
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
