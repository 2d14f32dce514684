"""chroma_lm and audio_encoder with two instances each (what --dp-size 2 renders on two GPUs, here
CPU instances of the tiny checkpoint) on a real tritonserver, sharing what they keep between
turns: a conversation's next turn finds its previous prompt in the thinker prefix cache of either
engine (``shared_thinker_prefixes``, engine/peer_prefixes.py: the instance that lacks it copies
it), and its clips' embeddings in either encoder (``shared_clip_mib``, serving/peer_clips.py).

Each engine has one row (``max_batch`` 1), so a turn sent beside another request goes to
whichever instance that request leaves free (``hold_when_full``): about half the turns reach the
instance that did not serve the turn before."""

from __future__ import annotations

import re
import threading
import urllib.request

import pytest

from chroma_triton.bench.conversation import conversation
from chroma_triton.serving import protocol as P
from chroma_triton.serving.repository import RenderSpec, render_repository
from chroma_triton.serving.tritonserver import TritonServer

from test_triton_server import Stream, set_instances

pytestmark = pytest.mark.triton


@pytest.fixture(scope="module")
def server(triton_install, tmp_path_factory, tiny_checkpoint):
    repo = tmp_path_factory.mktemp("rendered") / "model_repository"
    render_repository(repo, RenderSpec(model_path=str(tiny_checkpoint), params={
        "chroma_lm": {"max_batch": "1", "shared_thinker_prefixes": "true", "thinker_prefix_cache_mib": "64",
                      "thinker_prefix_min_tokens": "64"},
        "audio_encoder": {"shared_clip_mib": "16"}}))
    for model in ("chroma_lm", "audio_encoder"):
        set_instances(repo, model, 2)  # two instances, as on two GPUs
    log = tmp_path_factory.mktemp("logs") / "tritonserver.log"
    srv = TritonServer(repo, log_file=log)
    srv.start(timeout=240)
    srv.log = log
    yield srv
    srv.stop()


def counters(server) -> dict[tuple[str, str], float]:
    """(metric, its "how" label or "") -> the sum over instances."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    text = opener.open(f"http://{server.metrics_url}/metrics", timeout=5).read().decode()
    out: dict[tuple[str, str], float] = {}
    for m in re.finditer(r'^(chroma_\w+_total)\{([^}]*)\}\s+(\S+)$', text, re.M):
        how = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2))).get("how", "")
        out[m.group(1), how] = out.get((m.group(1), how), 0.0) + float(m.group(3))
    return out


def test_turns_on_either_instance_find_their_conversation(server, question_wav, ref_voice):
    """Three conversations, each turn 0 alone, then turn 1 beside a one-off request: every turn 1
    starts from its turn 0's stored prompt whichever engine it reached, and the one clip all of
    them send goes through an audio tower once."""
    log = server.log.read_text()
    assert log.count("clip embeddings shared through") == 2 and "are not shared" not in log
    before = counters(server)

    def run(messages, clips, seed, rid, outs, i):
        arrays = P.ensemble_inputs(messages, clips, ref_voice[0], ref_voice[1], max_tokens=6, seed=seed)
        outs[i] = Stream(server, arrays, request_id=rid).collect(timeout=120)

    for c in range(3):
        turns = [conversation([{"type": "text", "text": f"This is conversation {c}."}]
                              + [{"type": "audio", "audio_index": t} for t in range(n + 1)]) for n in range(2)]
        outs: list = [None]
        run(turns[0], [question_wav], 10 * c, f"c{c}t0", outs, 0)
        assert outs[0] is not None and outs[0]["finals"] == 1
        outs = [None, None]
        threads = [threading.Thread(target=run, args=(turns[1], [question_wav] * 2, 10 * c + 1, f"c{c}t1", outs, 0)),
                   threading.Thread(target=run, args=([{"role": "user", "content": [
                       {"type": "text", "text": f"A question of its own, number {c}."},
                       {"type": "audio", "audio_index": 0}]}], [question_wav], 99, f"other{c}", outs, 1))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=180)
        assert all(o is not None and o["finals"] == 1 for o in outs), outs
    after = counters(server)
    delta = {key: after.get(key, 0.0) - before.get(key, 0.0) for key in after}
    # every turn 1 prefilled only what follows its turn 0 (on the engine that served turn 0, or
    # copied to the other); nothing else shares 64 positions with a stored prompt
    assert delta["chroma_lm_prefill_prefix_prompts_total", ""] == 3, delta
    assert delta["chroma_lm_prefix_imports_lost_total", ""] == 0
    imported = delta["chroma_lm_prefix_imports_total", ""]
    # 12 clips sent, one distinct: embedded once, then from either encoder's cache or copied
    clips = {how: delta.get(("chroma_audio_encoder_clips_total", how), 0.0) for how in ("embedded", "reused", "shared")}
    assert clips["embedded"] == 1 and sum(clips.values()) == 12, clips
    print(f"turns copied from the other engine: {imported:.0f} of 3; clips {clips}")
