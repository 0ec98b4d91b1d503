"""Fault injection for tests: the process of a job (or of a Ray actor) exits on its Nth part, once.

BEI_BATCH_FAULT_EXIT_AT=N and BEI_BATCH_FAULT_MARKER=<file>: on its Nth part, a process whose marker file
does not exist yet writes it and exits at once (os._exit: no cleanup, as on a kill -9, a lost node or an
OOM kill). Unset, nothing happens.
"""

from __future__ import annotations

import os
from pathlib import Path

FAULT_EXIT_AT = "BEI_BATCH_FAULT_EXIT_AT"
FAULT_MARKER = "BEI_BATCH_FAULT_MARKER"


def forwarded() -> dict[str, str]:
    """The fault variables of this process, to hand to Ray actors."""
    return {k: v for k, v in os.environ.items() if k in (FAULT_EXIT_AT, FAULT_MARKER)}


def maybe_exit(parts_started: int) -> None:
    at, marker = os.environ.get(FAULT_EXIT_AT), os.environ.get(FAULT_MARKER)
    if at and marker and parts_started == int(at) and not Path(marker).exists():
        Path(marker).write_text(f"process {os.getpid()} exited on its part {parts_started}\n")
        os._exit(17)
