"""Fault injection: each scenario injects one kind of fault several times, at random points, into a
real run on this machine (local Ray, DeepSpeed on the CPU, moto's S3 server, a real MLflow server)
and checks what must hold afterwards. ``python -m bench.faults`` runs them and prints the table of
docs/reliability.md; ``--short`` is the variant CI runs (tests/platform/test_faults.py).

A scenario is a function ``(Settings) -> Outcome`` registered with ``@scenario``. It owns everything
it starts (servers, Ray, temporary folders) and stops it before it returns, bounded in time: a
scenario that overruns its ``budget_s`` is reported as not held.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class Settings:
    """How hard to try. ``short``: the CI variant (fewest injections that still show the property)."""

    short: bool = False
    seed: int = 0
    work_dir: str = ""  # scratch space for the scenario (a fresh temporary folder per scenario)

    def rng(self, name: str) -> random.Random:
        """The scenario's own random source: the same injection points for the same seed."""
        return random.Random(f"{self.seed}:{name}")


@dataclass
class Outcome:
    """What one scenario did and found.

    ``injections``: faults injected; ``held``: how many of them ended as the table's "must hold" says;
    ``details``: one line per injection (where it hit, what happened), for the report.
    """

    fault: str
    injected: str
    must_hold: str
    injections: int = 0
    held: int = 0
    details: list[str] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.injections > 0 and self.held == self.injections

    def record(self, held: bool, detail: str) -> None:
        self.injections += 1
        self.held += int(held)
        self.details.append(("held: " if held else "FAILED: ") + detail)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


@dataclass(frozen=True)
class Scenario:
    name: str
    run: Callable[[Settings], Outcome]
    budget_s: float  # the full variant's time limit on a 2-core box; the short one gets half
    in_short: bool  # part of the CI variant


SCENARIOS: dict[str, Scenario] = {}


def scenario(name: str, *, budget_s: float, in_short: bool = True) -> Callable:
    """Register ``fn`` as the scenario ``name`` (see the module docstring)."""

    def register(fn: Callable[[Settings], Outcome]) -> Callable[[Settings], Outcome]:
        if name in SCENARIOS:
            raise ValueError(f"fault scenario {name!r} registered twice")
        SCENARIOS[name] = Scenario(name, fn, budget_s, in_short)
        return fn

    return register


def load_all() -> dict[str, Scenario]:
    """Import every scenario module (each registers its scenarios) and return the registry."""
    import importlib
    import pkgutil

    for info in pkgutil.iter_modules(__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")
    return SCENARIOS
