"""The folder prometheus-client's multiprocess mode keeps the API workers' values in.

Apart from ingest_api.metrics on purpose: prometheus-client picks its mode when it is
first imported, by ``PROMETHEUS_MULTIPROC_DIR``, so ``serve`` must set the variable (and
make the folder) before anything of ours imports it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


@contextmanager
def shared_across(workers: int) -> Iterator[None]:
    """For ``serve``: a fresh multiprocess directory before its workers start, so
    ``/metrics`` sums them and no earlier run's values come back. An operator's
    ``PROMETHEUS_MULTIPROC_DIR`` is made if missing, emptied and kept; otherwise, with
    several workers, a temporary one is made and removed on exit. One worker keeps its
    values in memory: nothing to share, and cheaper."""
    given = os.environ.get(MULTIPROC_ENV)
    if workers == 1 and not given:
        yield
        return
    path = Path(given) if given else Path(tempfile.mkdtemp(prefix="trade-store-metrics-"))
    path.mkdir(parents=True, exist_ok=True)
    for stale in path.glob("*.db"):
        stale.unlink()
    os.environ[MULTIPROC_ENV] = str(path)
    try:
        yield
    finally:
        if not given:
            shutil.rmtree(path, ignore_errors=True)
            del os.environ[MULTIPROC_ENV]
