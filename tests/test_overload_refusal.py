"""Overload through the whole stack: a request that waits longer than ``max_queue_wait_s`` for an
engine row is refused with HTTP 429 (``server_busy``) and an OpenAI-style error body, while the
reply holding the row goes on; the server serves again once the row is free. Where nothing else
bounds the wait (the engine's bound off, or Triton's queue in front of two instances), the
frontend's ``--start-timeout`` does.

Small stacks of their own (one engine row per instance) on the CPU with the demo checkpoint.
"""

from __future__ import annotations

import time

import openai
import pytest
import requests

from openai_frontend.testing import TEST_FRONTEND_ARGS, ChromaStack, metric_value

from test_triton_server import set_instances

pytestmark = pytest.mark.triton

QUEUE_WAIT_S = 1.0


def _stack(tmp_path_factory, name: str, lm_params: dict, frontend_args=(), instances: int = 1) -> ChromaStack:
    """A CPU stack of the demo checkpoint with these chroma_lm parameters, ``instances`` chroma_lm
    instances and these frontend flags (after the tests' own)."""
    from chroma_triton.serving.repository import RenderSpec, render_repository

    workdir = tmp_path_factory.mktemp(name)
    repo = workdir / "model_repository"
    render_repository(repo, RenderSpec(kind="cpu", params={"chroma_lm": lm_params}))
    if instances != 1:
        set_instances(repo, "chroma_lm", instances)
    return ChromaStack(workdir, frontend_args=(*TEST_FRONTEND_ARGS, *frontend_args), repository=repo).start()


@pytest.fixture(scope="module")
def one_row_stack(triton_install, tmp_path_factory):
    stack = _stack(tmp_path_factory, "one_row_stack", {"max_batch": "1", "max_queue_wait_s": str(QUEUE_WAIT_S)})
    yield stack
    stack.stop()


def _metrics(stack) -> str:
    session = requests.Session()
    session.trust_env = False
    return session.get(f"http://{stack.triton.metrics_url}/metrics", timeout=5).text


def _metric(stack, name: str) -> float:
    return metric_value(_metrics(stack), name) or 0.0


def _request(**extra) -> dict:
    return dict(model="chroma", messages=[{"role": "user", "content": [
        {"type": "audio", "audio": "assets/question_audio.wav"}, {"type": "text", "text": "Tell me a story."}]}],
        extra_body={"return_audio": True}, **extra)


def _sdk(stack) -> openai.OpenAI:
    return openai.OpenAI(api_key="unused", base_url=f"{stack.frontend.url}/v1", max_retries=0, timeout=120)


def _refused_beside_a_holder(sdk, limit_s: float, what: str, stream: bool = False):
    """A long reply takes the one row; a second request must be refused within ``limit_s``.
    Returns (the RateLimitError, seconds it waited); the holder is closed. The random demo model
    may end a long reply early, which frees the row: then another seed is tried."""
    for seed in (1, 2, 3, 5, 8):
        holder = sdk.chat.completions.create(**_request(max_tokens=3000, seed=seed), stream=True)
        chunks = iter(holder)
        next(chunks)  # the row is taken: the reply is streaming
        t0 = time.monotonic()
        try:
            sdk.chat.completions.create(**_request(max_tokens=8, seed=seed), stream=stream)
        except openai.RateLimitError as exc:
            return exc, time.monotonic() - t0
        finally:
            holder.close()
        # served: the holder must have ended early (its 3000 frames take ~18 s here); served only
        # after waiting well past the limit means the limit did not hold
        assert time.monotonic() - t0 < limit_s + 8, f"waited past {what} and was served"
    pytest.skip(f"the demo model ended every long reply before {what} ran out")


def test_a_request_that_waits_too_long_for_a_row_gets_429(one_row_stack):
    sdk = _sdk(one_row_stack)
    before = _metric(one_row_stack, "chroma_lm_queue_timeouts_total")
    refused, waited = _refused_beside_a_holder(sdk, QUEUE_WAIT_S, "max_queue_wait_s")
    assert refused.status_code == 429
    error = refused.body if isinstance(refused.body, dict) else {}
    assert error.get("code") == "server_busy" and error.get("type") == "rate_limit_error", refused.body
    assert "server busy" in error["message"] and "max_queue_wait_s" in error["message"], error["message"]
    assert QUEUE_WAIT_S <= waited < 30, waited
    deadline = time.monotonic() + 10  # chroma_lm exports its counters every 0.25 s
    while _metric(one_row_stack, "chroma_lm_queue_timeouts_total") != before + 1:
        assert time.monotonic() < deadline, _metric(one_row_stack, "chroma_lm_queue_timeouts_total")
        time.sleep(0.1)
    # the row frees (the holder hung up) and the server serves again
    deadline = time.monotonic() + 60
    while True:
        try:
            reply = sdk.chat.completions.create(**_request(max_tokens=8, seed=1))
            break
        except openai.RateLimitError:
            assert time.monotonic() < deadline, "still refused a minute after the row's holder hung up"
            time.sleep(0.2)
    assert reply.choices[0].finish_reason in ("stop", "length")


START_TIMEOUT_S = 2.0


@pytest.fixture(scope="module")
def unbounded_queue_stack(triton_install, tmp_path_factory):
    """One engine row, the engine's own queue bound off (as Triton's queue is at dp > 1), and the
    frontend's ``--start-timeout`` at 2 s."""
    stack = _stack(tmp_path_factory, "unbounded_queue_stack", {"max_batch": "1", "max_queue_wait_s": "0"},
                   ("--start-timeout", str(START_TIMEOUT_S)))
    yield stack
    stack.stop()


def test_a_reply_that_does_not_start_in_time_gets_429_and_leaves_the_queue(unbounded_queue_stack):
    """Where nothing else bounds the wait for a row, the frontend does: the waiting request gets
    429 ``server_busy`` after ``--start-timeout``, and its request leaves the engine's queue."""
    stack = unbounded_queue_stack
    sdk = _sdk(stack)
    cancelled = _metric(stack, "chroma_lm_cancelled_total")
    refused, waited = _refused_beside_a_holder(sdk, START_TIMEOUT_S, "--start-timeout", stream=True)
    error = refused.body if isinstance(refused.body, dict) else {}
    assert refused.status_code == 429 and error.get("code") == "server_busy", refused.body
    assert "did not start within 2 s" in error["message"] and "start_timeout" in error["message"], error["message"]
    assert START_TIMEOUT_S <= waited < 15, waited
    # both requests leave the engine: the refused one cancelled from the queue, the holder hung up
    deadline = time.monotonic() + 30
    while _metric(stack, "chroma_lm_cancelled_total") < cancelled + 2 or \
            _metric(stack, "chroma_lm_queued_requests") or _metric(stack, "chroma_lm_active_requests"):
        assert time.monotonic() < deadline, (_metric(stack, "chroma_lm_cancelled_total"),
                                             _metric(stack, "chroma_lm_queued_requests"))
        time.sleep(0.1)
    reply = sdk.chat.completions.create(**_request(max_tokens=8, seed=1))
    assert reply.choices[0].finish_reason in ("stop", "length")


@pytest.fixture(scope="module")
def two_instance_stack(triton_install, tmp_path_factory):
    """Two chroma_lm instances of one row each (what --dp-size 2 renders, on the CPU): a request
    beyond both rows waits in Triton's queue (``hold_when_full``), which has no bound of its own;
    the frontend's ``--start-timeout`` at 2 s."""
    stack = _stack(tmp_path_factory, "two_instance_stack", {"max_batch": "1"}, ("--start-timeout", str(START_TIMEOUT_S)),
                   instances=2)
    yield stack
    stack.stop()


def test_a_request_in_tritons_queue_gets_429_after_the_start_timeout(two_instance_stack):
    stack = two_instance_stack
    sdk = _sdk(stack)
    finished = _metric(stack, "chroma_lm_finished_total")
    holders = [sdk.chat.completions.create(**_request(max_tokens=3000, seed=seed), stream=True) for seed in (1, 2)]
    try:
        for h in holders:
            next(iter(h))  # both rows taken
        t0 = time.monotonic()
        with pytest.raises(openai.RateLimitError) as refused:
            sdk.chat.completions.create(**_request(max_tokens=8, seed=3), stream=True)
        waited = time.monotonic() - t0
        pending = _metric(stack, "nv_inference_pending_request_count")
    finally:
        for h in holders:
            h.close()
    assert "did not start within 2 s" in refused.value.body["message"], refused.value.body
    assert START_TIMEOUT_S <= waited < 15, waited
    # the refused request leaves Triton's queue without ever generating; both rows free again
    deadline = time.monotonic() + 30
    while True:
        text = _metrics(stack)
        if not metric_value(text, "nv_inference_pending_request_count") and not metric_value(text, "chroma_lm_active_requests"):
            break
        assert time.monotonic() < deadline, (pending, metric_value(text, "nv_inference_pending_request_count"))
        time.sleep(0.2)
    time.sleep(1.0)  # a request Triton still held would be executed now: the rows are free
    assert _metric(stack, "chroma_lm_finished_total") == finished  # the refused request never ran to its end
    reply = sdk.chat.completions.create(**_request(max_tokens=8, seed=1))
    assert reply.choices[0].finish_reason in ("stop", "length")
