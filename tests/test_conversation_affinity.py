"""Conversation affinity on a real tritonserver: ``chroma_lm`` with two instances (what
``--dp-size 2`` renders on two GPUs, here two CPU instances of the tiny checkpoint) and the sequence
batcher the launcher renders (``--conversation-affinity``), driven through the real frontend with
the ``openai`` SDK. Every later turn of a conversation must reach the instance that holds its
earlier prompt in its thinker prefix cache: without affinity Triton hands consecutive requests to
alternate instances, and the second turn finds nothing there.

Triton keeps a conversation for ``IDLE_S`` here while the frontend is told 600 s, so that a test
can make Triton forget a conversation the frontend still counts as named."""

from __future__ import annotations

import base64
import re
import time
import urllib.request

import openai
import pytest

from chroma_triton.bench.clients import tagged_clip
from chroma_triton.serving import protocol as P
from chroma_triton.serving.affinity import ID_MISSING
from chroma_triton.serving.repository import RenderSpec, render_repository
from chroma_triton.serving.tritonserver import TritonServer
from openai_frontend.testing import TEST_FRONTEND_ARGS, FrontendProcess

from test_triton_server import Stream, set_instances, user_turn

pytestmark = pytest.mark.triton

IDLE_S = 20.0
ASSISTANT = "Sure. It should stay dry and mild all afternoon, with a light breeze from the west."


@pytest.fixture(scope="module")
def stack(triton_install, tmp_path_factory, tiny_checkpoint):
    repo = tmp_path_factory.mktemp("rendered") / "model_repository"
    render_repository(repo, RenderSpec(model_path=str(tiny_checkpoint), conversation_idle_s=IDLE_S, params={
        "chroma_lm": {"max_batch": "2", "thinker_prefix_cache_mib": "64", "thinker_prefix_min_tokens": "64"}}))
    assert "sequence_batching" in set_instances(repo, "chroma_lm", 2)  # two engines, as on two GPUs
    logs = tmp_path_factory.mktemp("logs")
    triton = TritonServer(repo, log_file=logs / "tritonserver.log")
    triton.start(timeout=240)
    frontend = None
    try:
        # two workers: the conversations they named are in the store they share
        frontend = FrontendProcess(triton.grpc_url, log_file=logs / "frontend.log",
                                   args=[*TEST_FRONTEND_ARGS, "--workers", "2", "--conversation-idle-s", "600"]
                                   ).start(wait_ready=True)
        yield triton, frontend
    finally:
        if frontend is not None:
            frontend.stop()
        triton.stop()


def per_instance(server, name: str) -> dict[str, float]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    text = opener.open(f"http://{server.metrics_url}/metrics", timeout=5).read().decode()
    return {m.group(1): float(m.group(2)) for m in
            re.finditer(r'^%s\{[^}]*instance="([^"]+)"[^}]*\}\s+(\S+)$' % name, text, re.M)}


def clip_part(tag: int) -> dict:
    from chroma_triton.bench.clients import ASSETS
    data = base64.b64encode(tagged_clip(ASSETS / "question_audio.wav", tag)).decode()
    return {"type": "input_audio", "input_audio": {"data": data, "format": "wav"}}


def conversation(tag: int, turns: int, first: int = 0) -> list[dict]:
    """The messages of turn ``turns`` (0-based) of conversation ``tag``: every user turn a clip of its
    own, the same assistant text between them; ``first``: turns the client already had elsewhere."""
    messages = []
    for j in range(first + turns + 1):
        if j:
            messages.append({"role": "assistant", "content": ASSISTANT})
        messages.append({"role": "user", "content": [clip_part((tag << 8) | j)]})
    return messages


def log_since(frontend, offset: int) -> str:
    with open(frontend.log_path, "rb") as log:
        log.seek(offset)
        return log.read().decode(errors="replace")


def hits(server) -> float:
    return sum(per_instance(server, "chroma_lm_prefill_prefix_prompts_total").values())


def test_a_conversations_turns_stay_on_the_instance_that_holds_its_prompt(stack):
    """Two conversations of three turns, each conversation's turns one after another: with affinity
    every later turn continues a stored prompt (4 hits), on the instance the conversation started on.
    Each request on a connection of its own, so either frontend worker may take it: a later turn
    taken by the other worker still continues the conversation (Triton saw no second start)."""
    triton, frontend = stack
    before = hits(triton)
    triton_log = triton.log_path.stat().st_size
    for tag in (1, 2):
        ended = per_instance(triton, "chroma_lm_finished_total")
        for turn in range(3):
            with openai.OpenAI(api_key="unused", base_url=f"{frontend.url}/v1", max_retries=0, timeout=120) as sdk:
                reply = sdk.chat.completions.create(model="chroma", messages=conversation(tag, turn), max_tokens=4,
                                                    seed=turn)
            assert reply.choices[0].finish_reason in ("stop", "length")
        now = per_instance(triton, "chroma_lm_finished_total")
        assert sorted(now[k] - ended.get(k, 0.0) for k in now) == [0.0, 3.0], f"conversation {tag}: {ended} -> {now}"
    assert hits(triton) - before == 4, "every later turn should find its conversation's earlier prompt"
    with open(triton.log_path, "rb") as log:
        log.seek(triton_log)
        assert b"has a conflict" not in log.read()


def test_b_a_conversation_new_to_this_server_starts_with_its_history(stack):
    """A conversation whose history the client had elsewhere (its first request here already has
    assistant turns): the frontend starts it at once (Triton refuses nothing), and its next turn
    finds its prompt."""
    triton, frontend = stack
    sdk = openai.OpenAI(api_key="unused", base_url=f"{frontend.url}/v1", max_retries=0, timeout=120)
    before = hits(triton)
    log_from = frontend.log_path.stat().st_size
    for turn in range(2):
        reply = sdk.chat.completions.create(model="chroma", messages=conversation(3, turn, first=2), max_tokens=4)
        assert reply.choices[0].finish_reason in ("stop", "length")
    assert hits(triton) - before == 1
    assert "sent again as its first turn" not in log_since(frontend, log_from)


def test_b2_a_conversation_triton_forgot_is_started_again(stack):
    """Triton dropped a conversation (idle past its timeout, or a restart) that the frontend still
    counts as named: Triton refuses the continuation, and the frontend sends the request again as
    the conversation's first turn."""
    triton, frontend = stack
    sdk = openai.OpenAI(api_key="unused", base_url=f"{frontend.url}/v1", max_retries=0, timeout=120)
    sdk.chat.completions.create(model="chroma", messages=conversation(4, 0), max_tokens=4)
    time.sleep(IDLE_S + 2)
    log_from = frontend.log_path.stat().st_size
    reply = sdk.chat.completions.create(model="chroma", messages=conversation(4, 1), max_tokens=4)
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert "sent again as its first turn" in log_since(frontend, log_from)


def test_c_a_direct_request_must_name_its_conversation(stack, question_wav, ref_voice):
    """Over gRPC, a request that names no conversation (no sequence_id) is refused, with Triton's message."""
    triton, _ = stack
    arrays = P.ensemble_inputs(user_turn("Hello."), [question_wav], ref_voice[0], ref_voice[1], max_tokens=3, seed=1)
    with pytest.raises(Exception, match=re.escape(ID_MISSING)):
        Stream(triton, arrays, request_id="nameless").collect()
