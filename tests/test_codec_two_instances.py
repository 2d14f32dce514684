"""codec_decoder with two instances (what --dp-size 2 renders on two GPUs, here two CPU instances
of the tiny checkpoint) on a real tritonserver, sharing their streams' SEANet states
(``shared_stream_states``, serving/peer_states.py): Triton hands a stream's chunks to either
instance, and a chunk that reaches the instance that did not decode the one before it continues
from the state the other left ("adopted") instead of decoding its context again."""

from __future__ import annotations

import re
import threading
import urllib.request

import numpy as np
import pytest

from chroma_triton.serving import protocol as P
from chroma_triton.serving.repository import RenderSpec, render_repository
from chroma_triton.serving.tritonserver import TritonServer

from test_triton_server import FRAME, Stream, set_instances, user_turn

pytestmark = pytest.mark.triton


@pytest.fixture(scope="module")
def server(triton_install, tmp_path_factory, tiny_checkpoint):
    repo = tmp_path_factory.mktemp("rendered") / "model_repository"
    render_repository(repo, RenderSpec(model_path=str(tiny_checkpoint),
                                       params={"codec_decoder": {"shared_stream_states": "64"}}))
    set_instances(repo, "codec_decoder", 2)  # two codecs, as on two GPUs
    log = tmp_path_factory.mktemp("logs") / "tritonserver.log"
    srv = TritonServer(repo, log_file=log)
    srv.start(timeout=180)
    srv.log = log
    yield srv
    srv.stop()


def chunks_by_instance(server) -> dict[tuple[str, str], float]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    text = opener.open(f"http://{server.metrics_url}/metrics", timeout=5).read().decode()
    out = {}
    for m in re.finditer(r'^chroma_codec_chunks_total\{([^}]*)\}\s+(\S+)$', text, re.M):
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
        out[labels["instance"], labels["how"]] = float(m.group(2))
    return out


def test_chunks_that_change_instance_continue_from_the_other_instances_state(server, question_wav, ref_voice):
    """Three streams at once, 60 frames each: both instances decode their chunks, and chunks
    continue from a state the other instance left; the audio is whole (a frame's samples per
    frame). (That an adopted state gives the samples one instance would have given is
    test_codec_streams' business, bitwise; here a chunk that reaches an instance while the one
    before it is still decoding on the other still restarts, so two runs may differ.)"""
    assert "stream states shared through" in server.log.read_text()
    before = chunks_by_instance(server)
    arrays = [P.ensemble_inputs(user_turn("Tell me a long story."), [question_wav], ref_voice[0], ref_voice[1],
                                max_tokens=60, seed=seed) for seed in (3, 4, 5)]
    outs: list = [None] * len(arrays)

    def run(i):
        outs[i] = Stream(server, arrays[i], request_id=f"s{i}").collect(timeout=120)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(arrays))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=180)
    for out in outs:
        assert out is not None and out["finals"] == 1
        assert len(out["pcm"]) == out["usage"][2] * FRAME and np.isfinite(out["pcm"]).all()
    after = chunks_by_instance(server)
    seen = {key: after.get(key, 0) - before.get(key, 0) for key in after}
    instances = {inst for inst, _ in seen}
    assert len(instances) == 2
    for inst in instances:  # both took chunks
        assert sum(v for (i, _), v in seen.items() if i == inst) > 0, seen
    adopted = sum(v for (_, how), v in seen.items() if how == "adopted")
    assert adopted >= 1, seen
