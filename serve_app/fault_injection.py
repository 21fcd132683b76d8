"""Faults on purpose, for the tests that prove serve_app survives them; inert unless the
replica's environment names a control file.

``SERVE_APP_WEDGE_FILE=/path``: while that file exists and lists this process's PID (one per
line), every forward pass in this process blocks, as a model stuck in a driver call or a
deadlocked kernel would. The process stays alive, so only a health check that runs the model
(``Classifier.check_health``) can tell. Naming a PID keeps the replacement replica healthy.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Optional

WEDGE_ENV = "SERVE_APP_WEDGE_FILE"

_wedge_file: Optional[Path] = Path(os.environ[WEDGE_ENV]) if os.environ.get(WEDGE_ENV) else None


def wedged(path: Optional[Path] = None, pid: Optional[int] = None) -> bool:
    """Whether ``path`` (default: the file named by the environment) names ``pid`` (default:
    this process)."""
    path = path or _wedge_file
    if path is None:
        return False
    try:
        pids = path.read_text().split()
    except OSError:
        return False
    return str(pid or os.getpid()) in pids


def block_while_wedged(poll_s: float = 0.2) -> None:
    """Return at once, unless this process is wedged on purpose: then only once it is not."""
    if _wedge_file is None:
        return
    while wedged():
        time.sleep(poll_s)
