"""``python -m bench.faults [--short] [--only NAME ...] [--seed N]``: run the fault scenarios.

Each scenario runs in its own process with its own time limit (``budget_s``; half in ``--short``),
so a hang or a crash is reported as a failed scenario and the others still run. The results go to
``bench/results/faults-<date>.jsonl`` (one JSON line per scenario) and the table of
docs/reliability.md is printed at the end. Exit 0 only if every scenario held.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import multiprocessing as mp
import sys
import tempfile
import time
from pathlib import Path

from bench.faults import Outcome, Scenario, Settings, load_all

RESULTS = Path(__file__).resolve().parents[1] / "results"


def _child(name: str, settings: Settings, queue: mp.Queue) -> None:
    try:
        outcome = load_all()[name].run(settings)
    except BaseException as err:  # reported, not raised: the other scenarios still run
        outcome = Outcome(fault=name, injected="", must_hold="", error=f"{type(err).__name__}: {err}")
    queue.put(outcome.to_dict())


def run_scenario(sc: Scenario, settings: Settings) -> dict:
    """Run one scenario in a fresh process within its time limit; the outcome as a dict."""
    # the target by its importable name: a spawned child cannot find functions of the __main__ that
    # `python -m bench.faults` runs (multiprocessing does not re-import a package's __main__)
    from bench.faults.__main__ import _child

    limit = sc.budget_s / 2 if settings.short else sc.budget_s
    ctx = mp.get_context("spawn")  # a fresh interpreter: no Ray, torch or server state carried over
    queue: mp.Queue = ctx.Queue()
    with tempfile.TemporaryDirectory(prefix=f"fractalgen-fault-{sc.name}-") as work:
        start = time.monotonic()
        proc = ctx.Process(
            target=_child, args=(sc.name, Settings(settings.short, settings.seed, work), queue)
        )
        proc.start()
        proc.join(limit)
        if proc.is_alive():
            proc.kill()
            proc.join(30)
            result = Outcome(fault=sc.name, injected="", must_hold="",
                             error=f"did not finish within its {limit:.0f} s limit").to_dict()  # fmt: skip
        else:
            try:
                result = queue.get(timeout=10)
            except Exception:
                result = Outcome(fault=sc.name, injected="", must_hold="",
                                 error=f"the scenario process died (exit {proc.exitcode})").to_dict()  # fmt: skip
        result["seconds"] = round(time.monotonic() - start, 1)
    result["scenario"] = sc.name
    return result


def table(results: list[dict]) -> str:
    """The markdown table of docs/reliability.md."""
    lines = [
        "| fault | injected | must hold | injections | held | result |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        verdict = "ok" if r["ok"] else f"**failed**: {r['error'] or 'see details'}"
        lines.append(
            f"| {r['fault']} | {r['injected']} | {r['must_hold']} | {r['injections']} | {r['held']} | {verdict} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.faults", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--short", action="store_true", help="the CI variant: fewer injections, half the time"
    )
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run these scenarios only")
    parser.add_argument("--seed", type=int, default=0, help="chooses the injection points (default 0)")
    parser.add_argument("--list", action="store_true", help="list the scenarios and exit")
    parser.add_argument("--out", type=Path, help="JSON lines file (default bench/results/faults-DATE.jsonl)")
    args = parser.parse_args(argv)
    registry = load_all()
    if args.list:
        for sc in registry.values():
            print(f"{sc.name:28s} budget {sc.budget_s:5.0f} s{'  (short variant)' if sc.in_short else ''}")
        return 0
    unknown = sorted(set(args.only or ()) - set(registry))
    if unknown:
        parser.error(f"unknown scenario(s) {unknown}; --list shows them")
    names = args.only or [n for n, sc in registry.items() if sc.in_short or not args.short]
    settings = Settings(short=args.short, seed=args.seed)
    out = args.out or RESULTS / f"faults-{dt.date.today():%Y-%m-%d}{'-short' if args.short else ''}.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    results = []
    for i, name in enumerate(names, 1):
        print(f"[{i}/{len(names)}] {name} ...", file=sys.stderr, flush=True)
        result = run_scenario(registry[name], settings)
        print(f"    {'held' if result['ok'] else 'FAILED'} in {result['seconds']:.0f} s: "
              f"{result['held']}/{result['injections']} {result['error'] or ''}", file=sys.stderr, flush=True)  # fmt: skip
        for line in result["details"]:
            print(f"      {line}", file=sys.stderr)
        results.append(result)
        with out.open("a") as f:
            f.write(json.dumps({**result, "date": dt.datetime.now().isoformat(timespec="seconds")}) + "\n")
    print(table(results))
    print(f"\nresults: {out}", file=sys.stderr)
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
