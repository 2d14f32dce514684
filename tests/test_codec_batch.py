"""Batched codec decoding (codec_decoder's dynamic batches): padded chunks of different lengths
decode to what each chunk gives alone, and a bad chunk fails alone."""

from __future__ import annotations

import numpy as np
import pytest

from chroma_triton.errors import InvalidRequestError
from chroma_triton.model.loading import load_parts
from chroma_triton.serving.triton_codec import CodecChunk, CodecService


@pytest.fixture(scope="module")
def codec(tiny_checkpoint):
    return load_parts(tiny_checkpoint, parts={"codec"}).codec


def test_batched_decode_equals_one_by_one(codec):
    rng = np.random.default_rng(0)
    chunks = [(rng.integers(0, codec.codebook_size, size=(n, codec.num_codebooks)), ctx)
              for n, ctx in [(2, 0), (4, 2), (22, 12), (9, 1), (12, 12)]]
    batched = codec.decode_batch(chunks)
    for (codes, ctx), audio in zip(chunks, batched):
        alone = codec.decode_chunk(codes, ctx)
        assert audio.shape == alone.shape == ((len(codes) - ctx) * codec.frame_size,)
        np.testing.assert_allclose(audio, alone, rtol=1e-5, atol=1e-4)  # float32 batch-kernel rounding


def test_a_bad_chunk_fails_alone(codec):
    service = CodecService(codec)
    good = np.zeros((1, 3, codec.num_codebooks), np.int32)  # with the leading batch dimension
    wrong_width = np.zeros((3, codec.num_codebooks + 1), np.int32)
    out = service.decode_many([CodecChunk(good, 1), CodecChunk(wrong_width, 0), CodecChunk(good, 5),
                               CodecChunk(good[:, :0], 0), CodecChunk(good, 1, "s", -3)])
    assert out[0].shape == (2 * codec.frame_size,)
    assert isinstance(out[1], InvalidRequestError) and "columns" in str(out[1])
    assert isinstance(out[2], InvalidRequestError) and "context_frames" in str(out[2])
    assert out[3].shape == (0,)
    assert isinstance(out[4], InvalidRequestError) and "start_frame" in str(out[4])
