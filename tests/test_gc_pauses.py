"""Garbage collection in the model processes (chroma_triton/serving/gc_pauses.py)."""

import gc

from chroma_triton.serving.gc_pauses import GcMonitor, freeze_after_load, freeze_if_asked


def test_monitor_times_each_collection_and_reports_the_long_ones():
    heard = []
    monitor = GcMonitor(on_pause=lambda gen, s: heard.append((gen, s)), report_s=0.0).install()
    try:
        junk = [[i] for i in range(50_000)]  # something to walk
        gc.collect()  # a full collection
        gc.collect(0)
    finally:
        monitor.uninstall()
    del junk
    assert monitor.collections[2] >= 1 and monitor.collections[0] >= 1
    assert monitor.seconds[2] > 0 and monitor.longest_s >= max(s for _, s in heard)
    assert (2, monitor.seconds[2]) == (2, sum(s for g, s in heard if g == 2))
    stats = monitor.stats()
    assert stats["gc_full"] == monitor.collections[2] and stats["gc_s"] >= stats["gc_full_s"] > 0
    before = list(monitor.collections)
    gc.collect()
    assert monitor.collections == before  # uninstalled: no longer counting


def test_a_failing_report_never_breaks_a_collection():
    def broken(gen, s):
        raise RuntimeError("report failed")
    monitor = GcMonitor(on_pause=broken, report_s=0.0).install()
    try:
        gc.collect()
    finally:
        monitor.uninstall()
    assert monitor.collections[2] >= 1


def test_freeze_exempts_what_exists_and_the_parameter_turns_it_off():
    class Args:
        def __init__(self, on):
            self.on = on

        def bool(self, key, default):
            assert key == "gc_freeze" and default is True
            return self.on
    try:
        assert freeze_if_asked(Args(False)) is None
        frozen = freeze_after_load()
        assert frozen == gc.get_freeze_count() > 1000
        assert freeze_if_asked(Args(True)) >= frozen
    finally:
        gc.unfreeze()
    assert gc.get_freeze_count() == 0
