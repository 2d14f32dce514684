"""The thinker's Whisper-style audio tower (transformers' Qwen2.5-Omni module) plus its
feature extractor: 16 kHz speech -> embeddings that replace the <|AUDIO|> tokens.

Embeddings are computed by :class:`ChunkedAudioTower` (the module's weights over a padded batch of
windows, without host syncs); on a GPU, :meth:`AudioTower.use_cuda_graphs` replays that as one
CUDA graph per window-count bucket."""

from __future__ import annotations

import numpy as np
import torch

from .audio_tower_chunks import ChunkedAudioTower, window_plan


def audio_token_count(num_feature_frames: int) -> int:
    """Embeddings the tower yields for a log-mel of `num_feature_frames` frames (two stride-2 steps)."""
    after_conv = (num_feature_frames - 1) // 2 + 1
    return (after_conv - 2) // 2 + 1


class AudioTower:
    def __init__(self, module: torch.nn.Module, feature_extractor):
        self.module = module
        self.feature_extractor = feature_extractor
        p = next(module.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.chunked = ChunkedAudioTower(module)
        self._graphs = None  # a StepRunner once use_cuda_graphs ran
        self._graph_windows: list[int] = []
        self.features_device = "cpu"  # where `features` computes its log-mels (see use_device_features)

    def use_device_features(self, on: bool = True) -> str:
        """Compute log-mels on the tower's device (the feature extractor's torch path there: its STFT
        and mel product as a few kernels) instead of the CPU; they come back to the host either way.
        Values agree with the CPU's within 1e-4 (float32 FFTs of another library; tests/test_gpu.py). Returns the
        device in use."""
        self.features_device = str(self.device) if on and self.device.type == "cuda" else "cpu"
        return self.features_device

    def use_cuda_graphs(self, max_windows: int) -> int:
        """Run batches of up to ``max_windows`` windows (``2 * n_window`` log-mel frames, 2 s of
        speech each) through CUDA graphs, one per power-of-two window count, all captured now;
        larger batches run eagerly. Returns the number of graphs (0 off a GPU)."""
        if self.device.type != "cuda" or max_windows <= 0:
            return 0
        from ..engine.graphs import StepRunner, batch_buckets  # the engine package imports the model package

        # one memory pool for all: embed_many copies each replay's rows out before the next replay
        self._graphs = StepRunner(True, shared_pool=True, device=self.device)
        self._graph_windows = batch_buckets(1 << (max_windows - 1).bit_length())
        mels = int(self.feature_extractor.feature_size)
        for windows in self._graph_windows:
            self.embed_many([torch.zeros(mels, self.chunked.window * windows)])
        return len(self._graphs)

    @property
    def sampling_rate(self) -> int:
        return int(self.feature_extractor.sampling_rate)

    def features(self, wav16k: np.ndarray) -> torch.Tensor:
        """Mono 16 kHz float32 -> log-mel features [num_mel_bins, frames] (no padding kept).

        Same values and frame count as the Qwen2.5-Omni processor, which pads every clip with
        zeros to `n_samples` ("max_length") and keeps ceil(samples / hop) frames: the last frames
        see zeros, not the reflection padding an unpadded clip would get, and there is one frame
        more than an unpadded extraction keeps. n_fft zeros are enough padding to reproduce that.
        """
        fe = self.feature_extractor
        wav16k = np.asarray(wav16k, dtype=np.float32)
        frames = -(-len(wav16k) // fe.hop_length)
        padded = np.concatenate([wav16k, np.zeros(fe.n_fft, dtype=np.float32)])
        out = fe(padded, sampling_rate=self.sampling_rate, padding="longest", truncation=False, return_tensors="pt",
                 device=self.features_device)
        return out["input_features"][0, :, :frames]

    def token_count(self, wav16k: np.ndarray) -> int:
        return audio_token_count(self.features(wav16k).shape[-1])

    @torch.inference_mode()
    def embed(self, wav16k: np.ndarray) -> torch.Tensor:
        """Mono 16 kHz float32 -> embeddings [audio_token_count, thinker hidden]."""
        feats = self.features(wav16k)
        if feats.shape[-1] < 4:
            raise ValueError("audio is too short: at least 40 ms of speech is needed")
        return self.embed_many([feats])[0]

    @torch.inference_mode()
    def embed_many(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        """Several clips' log-mels [mels, frames] -> their embeddings, in one batched forward."""
        if not feats:
            return []
        frames = [f.shape[-1] for f in feats]
        windows = len(window_plan(frames, self.chunked.window))
        if self._graphs is not None and windows <= self._graph_windows[-1]:
            rows = next(w for w in self._graph_windows if w >= windows)
            pooled = self._graphs(("tower", rows), self.chunked, *self.chunked.pack(feats, rows))
        else:
            pooled = self.chunked(*self.chunked.pack(feats))
        out = self.chunked.unpack(pooled, frames)
        for f, emb in zip(frames, out):
            if emb.shape[0] != audio_token_count(f):
                raise RuntimeError(f"audio tower returned {emb.shape[0]} embeddings, expected {audio_token_count(f)}")
        return out
