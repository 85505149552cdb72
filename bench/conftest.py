"""pytest options and the end-of-run summary for ``pytest bench/``.

``--record`` (or ``SEPICO_FAST_BENCH_RECORD=1``) appends every measured row to
``bench/results/<bench>.json``; without it nothing tracked is written. Either way one
table of all rows measured in the session is printed at the end.
"""
from __future__ import annotations

from bench import record as rec


def pytest_addoption(parser):
    parser.addoption("--record", action="store_true", default=False,
                     help="append the measured rows to bench/results/*.json (also: SEPICO_FAST_BENCH_RECORD=1)")


def pytest_configure(config):
    if config.getoption("--record", default=False):
        rec.RECORD = True


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    rows = rec.SESSION_ROWS
    where = (f"appended to {rec.results_folder()}" if rec.recording()
             else "not recorded (pytest bench/ --record or SEPICO_FAST_BENCH_RECORD=1 appends them to bench/results/)")
    terminalreporter.section("benchmark summary")
    terminalreporter.write_line(rec.summary_table(rows))
    terminalreporter.write_line(f"{len(rows)} rows, {where}")
