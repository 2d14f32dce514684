"""The thinker's Whisper-style audio tower (transformers' Qwen2.5-Omni module) plus its
feature extractor: 16 kHz speech -> embeddings that replace the <|AUDIO|> tokens."""

from __future__ import annotations

import numpy as np
import torch


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
        out = fe(padded, sampling_rate=self.sampling_rate, padding="longest", truncation=False, return_tensors="pt")
        return out["input_features"][0, :, :frames]

    def token_count(self, wav16k: np.ndarray) -> int:
        return audio_token_count(self.features(wav16k).shape[-1])

    @torch.inference_mode()
    def embed(self, wav16k: np.ndarray) -> torch.Tensor:
        """Mono 16 kHz float32 -> embeddings [audio_token_count, thinker hidden]."""
        feats = self.features(wav16k)
        if feats.shape[-1] < 4:
            raise ValueError("audio is too short: at least 40 ms of speech is needed")
        lens = torch.tensor([feats.shape[-1]], device=self.device)
        after_conv = (lens - 1) // 2 + 1
        out = self.module(feats.to(self.device, self.dtype), feature_lens=lens, aftercnn_lens=after_conv)
        emb = out.last_hidden_state
        expected = audio_token_count(feats.shape[-1])
        if emb.shape[0] != expected:
            raise RuntimeError(f"audio tower returned {emb.shape[0]} embeddings, expected {expected}")
        return emb
