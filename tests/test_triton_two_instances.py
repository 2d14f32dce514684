"""chroma_lm with two instances (what --dp-size 2 renders on two GPUs, here two CPU instances of
the tiny checkpoint) on a real tritonserver: an instance whose rows are all taken holds off
(``hold_when_full``), so Triton hands the next request to the other instance instead of queueing
it behind a stream that has seconds left."""

from __future__ import annotations

import re
import time
import urllib.request

import pytest

from chroma_triton.serving import protocol as P
from chroma_triton.serving.repository import RenderSpec, render_repository
from chroma_triton.serving.tritonserver import TritonServer

from test_triton_server import Stream, set_instances, user_turn

pytestmark = pytest.mark.triton


@pytest.fixture(scope="module", params=["per_request", "shared"])
def server(request, triton_install, tmp_path_factory, tiny_checkpoint):
    """Both relay modes (the CPU render's and the GPUs'): each submits its requests in ``execute``,
    before ``hold_when_full`` looks for a free row."""
    repo = tmp_path_factory.mktemp("rendered") / "model_repository"
    render_repository(repo, RenderSpec(model_path=str(tiny_checkpoint),
                                       params={"chroma_lm": {"max_batch": "1", "relays": request.param}}))
    set_instances(repo, "chroma_lm", 2)  # two engines, one row each
    srv = TritonServer(repo, log_file=tmp_path_factory.mktemp("logs") / "tritonserver.log")
    srv.start(timeout=180)
    yield srv
    srv.stop()


def scrape(server) -> str:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    return opener.open(f"http://{server.metrics_url}/metrics", timeout=5).read().decode()


def per_instance(text: str, name: str) -> dict[str, float]:
    return {m.group(1): float(m.group(2)) for m in
            re.finditer(r'^%s\{[^}]*instance="([^"]+)"[^}]*\}\s+(\S+)$' % name, text, re.M)}


def triton_pending(text: str, model: str) -> float:
    m = re.search(r'^nv_inference_pending_request_count\{[^}]*model="%s"[^}]*\}\s+(\S+)$' % model, text, re.M)
    return float(m.group(1)) if m else -1.0


def wait_until(predicate, timeout=15.0):
    deadline = time.monotonic() + timeout
    while not (ok := predicate()) and time.monotonic() < deadline:
        time.sleep(0.2)
    return ok


def test_full_instances_leave_requests_in_tritons_queue_for_the_first_free_row(server, question_wav, ref_voice):
    """Two instances of one row each, both streaming: a third request waits in Triton's queue (no
    instance takes it), and when one stream ends it starts on that instance at once, not behind
    the other stream, which is still going."""
    def send(seed, rid):
        return Stream(server, P.ensemble_inputs(user_turn("Tell me a story."), [question_wav], ref_voice[0],
                                                ref_voice[1], max_tokens=1000, seed=seed), request_id=rid)

    first, second = send(1, "first"), send(2, "second")
    third = None
    try:
        first.next(timeout=60)
        second.next(timeout=60)
        assert wait_until(lambda: sorted(per_instance(scrape(server), "chroma_lm_active_requests").values()) == [1.0, 1.0])
        third = send(3, "third")
        time.sleep(1.5)  # time enough for an instance to take it, were one willing
        text = scrape(server)
        assert triton_pending(text, "chroma_lm") == 1.0, "the third request should wait in Triton's queue"
        assert sum(per_instance(text, "chroma_lm_queued_requests").values()) == 0  # not in an engine's
        first.close(cancel=True)  # its row frees: the third request goes there
        third.next(timeout=60)
        second_done = not second.results.empty() and any(
            r.get_response().parameters["triton_final_response"].bool_param
            for r in list(second.results.queue) if not isinstance(r, Exception))
        assert not second_done, "the third request started only after the other stream ended"
    finally:
        for stream in (first, second, third):  # closing twice is harmless
            if stream is not None:
                try:
                    stream.close(cancel=True)
                except Exception:  # noqa: BLE001 - already closed
                    pass
