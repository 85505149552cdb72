"""What runs where, said once at start: logging, debug checks, the implementation per op.

Nothing here changes the method. The trainer calls ``configure_logging`` at its entry
point (so the one-time WARNINGs of a torch fallback on CUDA are seen) and
``announce_implementations`` in ``runner.setup``.
"""
from __future__ import annotations

import logging
import sys

import torch

from .. import ops
from ..contrast import implementation_report as contrast_report
from ..contrast.validation import debug_checks, set_debug_checks

LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"


def configure_logging(level: int = logging.INFO) -> None:
    """Send ``sepico_fast.*`` log records to stderr, unless the application set up logging."""
    package = logging.getLogger("sepico_fast")
    if package.handlers or logging.getLogger().handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    package.addHandler(handler)
    package.setLevel(level)


def implementation_lines(device: torch.device) -> list[str]:
    """One line per (implementation, reason): ``<impl> (<reason>): op, op, ...``."""
    groups: dict[tuple[str, str], list[str]] = {}
    for prefix, report in (("contrast", contrast_report(device)), ("ops", ops.implementation_report(device))):
        for op, choice in report.items():
            groups.setdefault(choice, []).append(f"{prefix}.{op}")
    return [f"  {impl} ({why}): {', '.join(names)}" for (impl, why), names in groups.items()]


def announce_implementations(cfg, device: torch.device, main: bool = True) -> None:
    """Apply ``--debug-checks`` and print the implementation of each op (main rank only)."""
    if getattr(cfg, "debug_checks", False):
        set_debug_checks(True)
    if not main:
        return
    print(f"implementations on {device}:")
    for line in implementation_lines(device):
        print(line)
    if debug_checks():
        print("  debug checks: on (value checks run eagerly with readable messages; one host "
              "sync each)")
    sys.stdout.flush()
