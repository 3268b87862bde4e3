"""How the processor stops: its signal handler, and the source wrapper by which a
partition ends where it stood."""

from __future__ import annotations

import signal
import threading
from datetime import timedelta

import pytest
from bytewax.testing import TestingSource

from cli.processor import stop_then_interrupt
from sources.stoppable import Stoppable


def test_a_partition_ends_once_stop_is_set_and_resumes_where_it_stood() -> None:
    stop = threading.Event()
    items = [1, 2, TestingSource.PAUSE(timedelta(minutes=1)), 3, 4]
    source = Stoppable(TestingSource(items, batch_size=2), stop)
    (key,) = source.list_parts()
    part = source.build_part("inbound", key, None)
    assert list(part.next_batch()) == [1, 2]
    assert list(part.next_batch()) == []
    assert part.next_awake() is not None  # the wrapped partition's own pause
    stop.set()
    with pytest.raises(StopIteration):
        part.next_batch()
    position = part.snapshot()
    part.close()

    assert position == 2  # the wrapped partition's own: two items read
    resumed = Stoppable(TestingSource([1, 2, 3, 4], batch_size=2), threading.Event())
    assert list(resumed.build_part("inbound", key, position).next_batch()) == [3, 4]


def test_the_first_signal_asks_the_processor_to_stop_a_second_interrupts_it() -> None:
    stop = threading.Event()
    handle = stop_then_interrupt(stop)
    handle(signal.SIGTERM, None)
    assert stop.is_set()
    with pytest.raises(KeyboardInterrupt):
        handle(signal.SIGINT, None)
