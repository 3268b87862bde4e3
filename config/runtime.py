"""Process-level tuning shared by the API workers and the processor."""

from __future__ import annotations

import gc
import sys


def tune_gc() -> None:
    """Fewer, larger collections for a process that allocates objects by the hundred
    thousand a second and frees them as fast: with the default young-generation threshold
    (700) the collector took ~10 % of the dataflow's time and ~7 % of an API worker's.
    What is loaded by now lives as long as the process, so it leaves the collector's view
    altogether."""
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)


# How long a thread may hold the interpreter while another waits for it (Python's default:
# 5 ms). An API worker's status-read threads, and the threads that pass work to and from
# its read processes, hold it while they work; the event loop acknowledging POSTs must not
# wait 5 ms for each turn it takes.
SWITCH_INTERVAL_S = 0.0005


def tune_switching() -> None:
    """Hand the interpreter over sooner between threads (API workers, for their reads)."""
    sys.setswitchinterval(SWITCH_INTERVAL_S)
