"""Tests that prove sharedict's promises with figures, each in a quick and a long variant.

The long variants are marked ``slow``, so the default run leaves them out; run them with
``pytest tests/stress -m slow``. A test reports its figures through the ``figures``
fixture, and the run prints them in a table at its end.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

FIGURE_PREFIX = "figure: "


@pytest.fixture
def figures(record_property: Callable[[str, object], None]) -> Callable[..., None]:
    """Record a test's figures, as in ``figures(kills=100, writes_lost=0)``."""

    def record(**values: object) -> None:
        for name, value in values.items():
            record_property(FIGURE_PREFIX + name, value)

    return record


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    rows = []
    for outcome in ("passed", "failed"):
        for report in terminalreporter.stats.get(outcome, []):
            if report.when != "call":
                continue
            for name, value in report.user_properties:
                if name.startswith(FIGURE_PREFIX):
                    rows.append((report.nodeid, name[len(FIGURE_PREFIX) :], value, outcome))
    if not rows:
        return
    terminalreporter.section("figures")
    for nodeid, name, value, outcome in rows:
        suffix = "" if outcome == "passed" else f"  ({outcome})"
        terminalreporter.write_line(f"{nodeid}  {name} = {_format(value)}{suffix}")


def _format(value: object) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.2f}"
    return str(value)
