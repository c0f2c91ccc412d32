"""The ``fractalgen`` entry points: Ctrl-C ends the program quietly, but reaches in-process callers."""

from __future__ import annotations

import signal
from collections.abc import Iterator

import pytest

import fractalgen.cli.inspect as inspect_cmd
from fractalgen.cli import console_main, main


@pytest.fixture(autouse=True)
def _python_sigint_handler() -> Iterator[None]:
    """Python's own SIGINT handler for the test (raises KeyboardInterrupt): libraries that earlier
    tests loaded (Ray, streaming) may have installed theirs, which would end the test run instead."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def _ctrl_c(*args, **kwargs) -> str:
    signal.raise_signal(signal.SIGINT)  # a real SIGINT, handled by Python's default handler
    return ""


def test_ctrl_c_interrupts_an_in_process_caller(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(inspect_cmd, "format_table", _ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        main(["inspect", "fractalmar_tiny16"])


def test_ctrl_c_ends_the_program_with_exit_130(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setattr(inspect_cmd, "format_table", _ctrl_c)
    assert console_main(["inspect", "fractalmar_tiny16"]) == 130
    assert "interrupted" in capsys.readouterr().err
