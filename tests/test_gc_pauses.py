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


def test_collection_reports_are_queued_and_written_with_the_next_event(tmp_path):
    """A collection can start on any thread, the engine's too, maybe while it writes the trace
    with the trace's lock held; its report (EngineTrace.note) takes no lock and writes nothing: it
    is queued, and the next event writes it first. Collections as often as possible here (the
    first 200 reported: each report allocates, which would start more)."""
    import threading

    from chroma_triton.engine.trace import EngineTrace

    trace = EngineTrace(tmp_path / "t.jsonl")
    reported = []

    def report(gen, s):
        if len(reported) < 200:
            reported.append(gen)
            trace.note("gc", gen=gen, s=s)

    monitor = GcMonitor(on_pause=report, report_s=0.0).install()
    thresholds = gc.get_threshold()

    def write():
        for i in range(300):
            trace.event("step", i=i, payload=[[j] for j in range(5)])
        trace.flush()

    gc.freeze()  # full collections walk only what the loop makes
    gc.set_threshold(1, 1, 1)
    try:
        writer = threading.Thread(target=write, daemon=True)
        writer.start()
        writer.join(60)
        hung = writer.is_alive()
    finally:
        gc.set_threshold(*thresholds)
        gc.unfreeze()
        monitor.uninstall()
    assert not hung, "writing the trace hung"
    trace.close()
    lines = (tmp_path / "t.jsonl").read_text().splitlines()
    assert sum('"ev": "step"' in line for line in lines) == 300
    assert sum('"ev": "gc"' in line for line in lines) == len(reported) == 200
