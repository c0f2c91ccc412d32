"""The short variant of the fault-injection scenarios (``python -m bench.faults --short``): every
registered scenario that is part of it injects its faults and everything that must hold holds."""

from __future__ import annotations

import pytest

from bench.faults import Settings, load_all
from bench.faults.__main__ import run_scenario

SHORT = sorted(name for name, sc in load_all().items() if sc.in_short)


@pytest.mark.slow
@pytest.mark.parametrize("name", SHORT)
def test_fault_scenario_holds(name: str) -> None:
    result = run_scenario(load_all()[name], Settings(short=True, seed=0))
    assert result["ok"], "\n".join([result["error"] or "", *result["details"]])
