"""Reports how many SIGKILLs the fault-injection tests sent and checked."""

from __future__ import annotations

from tests.reliability.faultlib import KILLS


def pytest_terminal_summary(terminalreporter):
    if KILLS["performed"]:
        terminalreporter.write_line(
            f"fault injection: {KILLS['performed']} SIGKILLs sent, "
            f"{KILLS['checked']} resumed runs checked against the reference"
        )
