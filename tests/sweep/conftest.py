"""The chaos test's figures in pytest's own summary: a test that calls ``record_property("chaos", line)``
has its line printed in a ``chaos`` section at the end of the run, so CI's plain ``pytest`` log
shows the faults injected, survived and the runs lost (also in JUnit XML as a property)."""

from __future__ import annotations


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    lines = [
        f"{report.nodeid}: {value}"
        for reports in terminalreporter.stats.values()
        for report in reports
        if getattr(report, "when", None) == "call"
        for name, value in getattr(report, "user_properties", [])
        if name == "chaos"
    ]
    if lines:
        terminalreporter.write_sep("=", "chaos")
        for line in lines:
            terminalreporter.write_line(line)
