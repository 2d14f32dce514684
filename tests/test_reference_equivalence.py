"""Our engine against transformers: trunk, thinker, audio tower, and end to end against the naive
reference-style generator (`chroma_triton.reference`), all in float32 on the tiny checkpoint.

The reference builds its own transformers modules (Qwen2.5-Omni thinker, two `LlamaModel`s) from
the checkpoint and shares no model code with the engine, only the counter-based sampler, so
equal logits give equal codes: the end-to-end comparisons demand exact equality.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from chroma_triton.audio_io import decode_audio
from chroma_triton.engine import AudioChunk, EngineOptions, Finished, SamplingParams, TextDelta
from chroma_triton.model.loading import load_parts
from chroma_triton.model.thinker import TorchThinker
from chroma_triton.model.trunk import rope_inv_freq
from chroma_triton.pipeline import ChromaPipeline
from chroma_triton.reference import ReferenceChroma

ASSETS = Path(__file__).resolve().parent.parent / "assets"
QUESTION = ASSETS / "question_audio.wav"
REF_WAV = ASSETS / "ref_audio.wav"
REF_TEXT = (ASSETS / "ref_audio.txt").read_text().strip()
BRIGHT_WAV = ASSETS / "voices" / "bright.wav"
BRIGHT_TEXT = (ASSETS / "voices" / "bright.txt").read_text().strip()
TOL = 1e-4  # fp32, different kernels (static-cache SDPA vs DynamicCache SDPA)


@pytest.fixture(scope="module")
def pipe(tiny_checkpoint):
    p = ChromaPipeline.from_pretrained(tiny_checkpoint, options=EngineOptions(max_batch=4))
    yield p
    p.close()


@pytest.fixture(scope="module")
def reference(tiny_checkpoint):
    return ReferenceChroma.from_checkpoint(tiny_checkpoint)


@pytest.fixture(scope="module")
def ours(tiny_checkpoint):
    """Our modules, loaded apart from the pipeline's (whose engine thread owns its caches)."""
    return load_parts(tiny_checkpoint, parts={"thinker", "audio_tower", "frame_model", "tokenizer"}, dtype=torch.float32)


def user(*parts):
    return [{"role": "user", "content": list(parts)}]


def audio_part(path):
    return {"type": "audio", "audio": str(path)}


def text_part(text):
    return {"type": "text", "text": text}


def run_engine(pipe, requests) -> list[dict]:
    """Submit all requests at once (they share batched steps), then collect each stream."""
    streams = [pipe.engine.submit(copy.deepcopy(r)) for r in requests]
    results = []
    for stream in streams:
        chunks, finished, text = [], None, ""
        for ev in stream:
            if isinstance(ev, AudioChunk):
                chunks.append(ev.codes[ev.context_frames:])
            elif isinstance(ev, TextDelta):
                text += ev.text
            elif isinstance(ev, Finished):
                finished = ev
        assert finished is not None, "stream ended without Finished (request failed?)"
        codes = np.concatenate(chunks) if chunks else np.zeros((0, 8), np.int64)
        results.append({"codes": codes, "finished": finished, "text": text})
    return results


def first_difference(a: np.ndarray, b: np.ndarray) -> str:
    n = min(len(a), len(b))
    bad = np.flatnonzero((a[:n] != b[:n]).any(axis=1))
    return f"lengths {len(a)} vs {len(b)}; first differing frame {bad[0] if len(bad) else None}"


# -- 1. trunk vs transformers' LlamaModel ---------------------------------------------------------
def _compare_trunk(trunk, hf_model, seed: int) -> float:
    from transformers import DynamicCache

    cfg = trunk.cfg
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 25, cfg.hidden_size, generator=g)
    cache, rotary = trunk.new_cache(rows=2, max_len=32, device="cpu", dtype=torch.float32)
    hf_cache = DynamicCache()
    diffs = []
    with torch.inference_mode():
        spans = [(0, 20)] + [(p, p + 1) for p in range(20, 25)]  # prefill 20, then 5 single-token steps
        for start, end in spans:
            ours = trunk(x[:, start:end], cache, rotary, positions=torch.arange(start, end)[None], key_len=end,
                         row_start=1)  # not row 0, so row addressing is exercised
            theirs = hf_model(inputs_embeds=x[:, start:end], past_key_values=hf_cache, use_cache=True).last_hidden_state
            diffs.append((ours - theirs).abs().max().item())
    return max(diffs)


@pytest.mark.parametrize("part", ["backbone", "decoder"])
def test_trunk_matches_transformers_llama(ours, reference, part):
    trunk = getattr(ours.frame_model, part).model
    hf_model = getattr(reference, part)
    assert trunk.cfg.rope.kind == "llama3" and hf_model.config.rope_parameters["rope_type"] == "llama3"
    torch.testing.assert_close(rope_inv_freq(trunk.cfg.rope, trunk.cfg.head_dim), hf_model.rotary_emb.inv_freq,
                               rtol=1e-6, atol=0)
    diff = _compare_trunk(trunk, hf_model, seed=1 if part == "backbone" else 2)
    assert diff < TOL, f"{part}: max |ours - transformers| = {diff:.3g}"


# -- 2. thinker and audio tower vs transformers' Qwen2.5-Omni thinker ------------------------------
def _processor_features(feature_extractor, wav16k):
    """What Qwen2.5-Omni's processor feeds the thinker: zero-padded to n_samples, with a mask."""
    out = feature_extractor(wav16k, sampling_rate=16000, return_attention_mask=True, padding="max_length",
                            return_tensors="pt")
    return out["input_features"], out["attention_mask"]


@pytest.mark.parametrize("seconds", [None, 1.0, 1.37])
def test_audio_tower_matches_transformers(ours, reference, seconds):
    tower = ours.audio_tower
    wav = decode_audio(QUESTION, 16000)
    if seconds is not None:  # odd lengths too (token counts depend on the feature frame count)
        wav = wav[: int(seconds * 16000)]
    feats, mask = _processor_features(tower.feature_extractor, wav)
    with torch.inference_mode():
        mine = tower.embed(wav)
        theirs = reference.thinker.get_audio_features(feats, feature_attention_mask=mask).last_hidden_state
    assert mine.shape == theirs.shape
    assert tower.token_count(wav) == theirs.shape[0]
    diff = (mine - theirs).abs().max().item()
    assert diff < 1e-5, f"audio tower: max diff {diff:.3g}"


def test_thinker_matches_transformers(pipe, ours, reference):
    """Our static-cache thinker (with our audio embeddings) vs transformers' thinker on its native
    path (input_ids + input_features, mrope positions computed by transformers)."""
    from transformers import DynamicCache

    wav = decode_audio(QUESTION, 16000)
    req = pipe.prepare(user(audio_part(QUESTION), text_part("Answer briefly.")), REF_WAV, REF_TEXT,
                       SamplingParams(seed=0))
    ids = torch.tensor(req.thinker_ids)
    thinker = TorchThinker(ours.thinker_lm, ours.config.thinker, rows=2, max_len=256)
    feats, mask = _processor_features(ours.audio_tower.feature_extractor, wav)
    steps, diffs, mine_ids, their_ids = 10, [], [], []
    with torch.inference_mode():
        h, tok = thinker.prefill(0, [(ids, ours.audio_tower.embed(wav))])
        h, tok = h[0], int(tok[0])
        out = reference.thinker(input_ids=ids[None], input_features=feats, feature_attention_mask=mask,
                                attention_mask=torch.ones_like(ids[None]), past_key_values=(cache := DynamicCache()),
                                use_cache=True, output_hidden_states=True)
        their_tok = int(out.logits[0, -1].argmax())
        for step in range(steps):
            diffs.append((h - out.hidden_states[-1][0, -1]).abs().max().item())
            mine_ids.append(tok)
            their_ids.append(their_tok)
            pos = len(ids) + step
            hs, toks = thinker.decode(torch.tensor([tok]), torch.tensor([pos]), pos + 1)
            h, tok = hs[0], int(toks[0])
            out = reference.thinker(input_ids=torch.tensor([[their_tok]]), past_key_values=cache, use_cache=True,
                                    output_hidden_states=True)
            their_tok = int(out.logits[0, -1].argmax())
    assert mine_ids == their_ids
    assert max(diffs) < TOL, f"thinker hidden states: max diff {max(diffs):.3g}"


# -- 3. engine vs the naive reference, end to end --------------------------------------------------
def test_engine_matches_reference(pipe, reference):
    tok = pipe.parts.tokenizer
    requests = [
        pipe.prepare(user(audio_part(QUESTION)), REF_WAV, REF_TEXT,
                     SamplingParams(temperature=1.0, top_p=1.0, seed=11, max_tokens=40)),
        pipe.prepare(user(text_part("What should I cook tonight?")), BRIGHT_WAV, BRIGHT_TEXT,
                     SamplingParams(temperature=0.7, top_p=0.9, seed=12, max_tokens=30)),
        pipe.prepare(user(audio_part(QUESTION), text_part("Be quick.")), REF_WAV, REF_TEXT,
                     SamplingParams(temperature=1.0, top_p=0.9, top_k=20, seed=13, max_tokens=35)),
    ]
    engine_out = run_engine(pipe, requests)  # batched together, different prompt lengths
    for req, got in zip(requests, engine_out):
        ids, codes, reason = reference.generate(req)
        fin = got["finished"]
        assert np.array_equal(got["codes"], codes), first_difference(got["codes"], codes)
        assert (fin.reason, fin.audio_frames) == (reason, len(codes)) == ("length", req.sampling.max_tokens)
        assert fin.text_tokens == len(ids)
        assert fin.text == got["text"] == tok.decode(ids, skip_special_tokens=True)
    # the same request alone, through the pipeline's own streaming API
    alone = [ev for ev in pipe.stream(copy.deepcopy(requests[1]))]
    codes = np.concatenate([ev.codes[ev.context_frames:] for ev in alone if isinstance(ev, AudioChunk)])
    assert np.array_equal(codes, engine_out[1]["codes"])


# -- 4. EOS (and the thinker's <|im_end|>) against the reference -----------------------------------
def _edit_for_eos(src: Path, dst: Path) -> None:
    """A copy of the checkpoint where an EOS frame is likely within a few frames and the thinker
    ends its reply (<|im_end|>) after a few tokens.

    - Decoder: attention and MLP outputs zeroed (o_proj, down_proj), so its state for codebook k is
      RMSNorm(projection(embed_{k-1}(c_{k-1}))); column 0 of codebook_head[k-1] points along that
      state for c_{k-1} = 0 (times 100): once codebook 0 is 0, codebooks 1..K-1 are 0 (EOS frame).
    - Backbone: codebook0_head row 0 = a unit vector, so code 0 gets a logit ~ N(0, 1) against
      ~0.2 for the others: an EOS frame every dozen frames or so, depending on the states.
    - Thinker: lm_head's <|im_end|> row = 2 x a unit vector: greedy picks it after a few tokens.
    """
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    weight_map = json.loads((dst / "model.safetensors.index.json").read_text())["weight_map"]
    shards: dict[str, dict[str, torch.Tensor]] = {}

    def get(key):
        shard = weight_map[key]
        if shard not in shards:
            shards[shard] = load_file(str(dst / shard))
        return shards[shard][key].float()

    def put(key, value):
        shards[weight_map[key]][key] = value.to(torch.bfloat16).contiguous()

    dec = cfg["decoder_config"]
    vocab, k_books = dec["vocab_size"], cfg["audio_num_codebooks"]
    for i in range(dec["num_hidden_layers"]):
        for name in ("self_attn.o_proj.weight", "mlp.down_proj.weight"):
            put(f"decoder.model.layers.{i}.{name}", torch.zeros_like(get(f"decoder.model.layers.{i}.{name}")))
    emb = get("backbone.audio_embedding.embed_audio_tokens.weight")
    proj, head = get("decoder.projection.weight"), get("decoder.codebook_head.weight")
    for k in range(1, k_books):
        state = proj @ emb[(k - 1) * vocab]
        head[k - 1][:, 0] = 100 * state / state.norm()
    put("decoder.codebook_head.weight", head)
    c0 = get("backbone.codebook0_head.weight")
    w = torch.randn(c0.shape[1], generator=torch.Generator().manual_seed(0))
    c0[0] = w / w.norm()
    put("backbone.codebook0_head.weight", c0)
    lm = get("thinker.lm_head.weight")
    w = torch.randn(lm.shape[1], generator=torch.Generator().manual_seed(1))
    lm[cfg["im_end_token_id"]] = 2 * w / w.norm()
    put("thinker.lm_head.weight", lm)
    for shard, tensors in shards.items():
        save_file(tensors, str(dst / shard), metadata={"format": "pt"})


def test_eos_and_reply_end_match_reference(pipe, tiny_checkpoint, tmp_path_factory):
    edited = tmp_path_factory.mktemp("eos") / "tiny-eos"
    _edit_for_eos(tiny_checkpoint, edited)
    eos_pipe = ChromaPipeline.from_pretrained(edited, options=EngineOptions(max_batch=4))
    try:
        eos_ref = ReferenceChroma.from_checkpoint(edited)
        # inputs from the unedited pipeline: tokenizer, audio tower and codec are unchanged
        requests = [pipe.prepare(user(audio_part(QUESTION)), REF_WAV, REF_TEXT,
                                 SamplingParams(temperature=1.0, seed=seed, max_tokens=40)) for seed in range(10)]
        engine_out = run_engine(eos_pipe, requests)
        stops, reply_ended = [], 0
        for req, got in zip(requests, engine_out):
            ids, codes, reason = eos_ref.generate(req)
            fin = got["finished"]
            assert np.array_equal(got["codes"], codes), first_difference(got["codes"], codes)
            assert (fin.reason, fin.audio_frames, fin.text_tokens) == (reason, len(codes), len(ids))
            assert fin.text == eos_pipe.parts.tokenizer.decode(ids, skip_special_tokens=True)
            steps = len(codes) + (reason == "stop")  # the EOS frame is a step too
            reply_ended += len(ids) < (steps - 1) // 2 + 1  # talking all along: a token on steps 0, 2, 4...
            if reason == "stop":
                stops.append(len(codes))
    finally:
        eos_pipe.close()
    assert len(stops) >= 4 and max(stops) >= 3, f"edited checkpoint should stop early and often: {stops}"
    assert reply_ended >= 1, "no request saw the thinker end its reply"
