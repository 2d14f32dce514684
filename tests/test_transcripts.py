"""The transcript stores behind OpenAI's multi-turn audio references (openai_frontend/transcripts.py)."""

from __future__ import annotations

import sqlite3
import time

import pytest

from openai_frontend.transcripts import MemoryTranscripts, SharedTranscripts

LATER = time.time() + 3600


@pytest.fixture(params=["memory", "shared"])
def store(request, tmp_path):
    if request.param == "memory":
        yield MemoryTranscripts(capacity=5)
    else:
        shared = SharedTranscripts(str(tmp_path / "t.sqlite3"), capacity=5, prune_every=1)
        yield shared
        shared.close()


def test_put_get_replace_and_expiry(store):
    store.put("audio_a", "first", LATER)
    store.put("audio_a", "second", LATER)
    store.put("audio_old", "gone", time.time() - 1)
    assert store.get("audio_a") == "second"
    assert store.get("audio_old") is None and store.get("audio_unknown") is None


def test_capacity_drops_the_oldest(store):
    for i in range(8):
        store.put(f"audio_{i}", f"t{i}", LATER)
    store.put("audio_5", "t5 again", LATER)  # rewritten: now the newest
    store.put("audio_6", "t6 again", LATER)
    kept = [i for i in range(8) if store.get(f"audio_{i}") is not None]
    assert kept == [3, 4, 5, 6, 7]
    assert store.get("audio_5") == "t5 again" and store.get("audio_6") == "t6 again"


def test_shared_store_is_seen_by_every_connection(tmp_path):
    """Each worker process opens the file itself: what one writes, another reads."""
    path = str(tmp_path / "t.sqlite3")
    writer, reader = SharedTranscripts(path), SharedTranscripts(path)
    writer.put("audio_x", "hello there", LATER)
    assert reader.get("audio_x") == "hello there"
    reader.put("audio_y", "and back", LATER)
    assert writer.get("audio_y") == "and back"
    writer.close(), reader.close()


def test_shared_store_failures(tmp_path, caplog):
    """A write that fails is logged, not raised (the reply has gone out already); a read that
    fails raises, for the caller to answer 503."""
    store = SharedTranscripts(str(tmp_path / "t.sqlite3"))
    store.close()
    store.put("audio_x", "lost", LATER)
    assert "transcript of audio_x not stored" in caplog.text
    with pytest.raises(sqlite3.Error):
        store.get("audio_x")
