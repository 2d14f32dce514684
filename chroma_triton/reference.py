"""A naive, reference-style Chroma generator: the slow baseline and the engine's test oracle.

This is DESIGN.md §1's generation algorithm written the way the upstream reference runs it:
eager transformers modules (`Qwen2_5OmniThinkerForConditionalGeneration` for the thinker,
`LlamaModel` over `inputs_embeds` for the backbone and the depth decoder), growing
`DynamicCache`s, batch 1, one Python step per frame. It shares no model code with the engine
(`Trunk`, `TorchThinker`, `FrameModel`, `ChromaEngine`); it only reuses the checkpoint file
reader, the tokenizer loader (for the special-token ids) and the counter-based `sample` /
`stream_keys`, called exactly as `FrameModel._sample` calls them, so equal logits give equal codes.

Choices, stated once:
- The user's audio enters as `request.audio_embeds` (what the engine gets): they replace the
  `<|AUDIO|>` positions of the thinker's input embeddings, passed as `inputs_embeds` together with
  `input_ids` (transformers then derives the rope positions from the ids as usual). The tests
  compare those embeddings with transformers' own `get_audio_features` separately.
- The returned text ids are the thinker's reply tokens t1, t2, ... without the final `<|im_end|>`.
- `request.sampling` is resolved like the engine does (`top_k` None -> the checkpoint's
  generation_config); a `seed` of None would draw a random seed, so give one to compare runs.
- Codes are returned unclamped ([frames, K]); Mimi decoding is left to the caller.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint.loader import Checkpoint
from .engine.request import GenerationRequest
from .sampling import sample, stream_keys

NO_FRAME_LIMIT = 1 << 30


def llama_config(cfg: dict):
    """A transformers `LlamaConfig` for the backbone / decoder sub-config (4.x or 5.x rope keys)."""
    from transformers import LlamaConfig

    rope = {**(cfg.get("rope_scaling") or {}), **(cfg.get("rope_parameters") or {})}
    if "type" in rope and "rope_type" not in rope:
        rope["rope_type"] = rope.pop("type")
    rope.setdefault("rope_type", "default")
    rope.setdefault("rope_theta", float(cfg.get("rope_theta", 500000.0)))
    heads = int(cfg["num_attention_heads"])
    return LlamaConfig(
        vocab_size=1,  # no token embedding: inputs are embeddings
        bos_token_id=None, eos_token_id=None, pad_token_id=None,
        hidden_size=int(cfg["hidden_size"]),
        intermediate_size=int(cfg["intermediate_size"]),
        num_hidden_layers=int(cfg["num_hidden_layers"]),
        num_attention_heads=heads,
        num_key_value_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=int(cfg.get("head_dim") or int(cfg["hidden_size"]) // heads),
        hidden_act=cfg.get("hidden_act", "silu"),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
        attention_bias=bool(cfg.get("attention_bias", False)),
        mlp_bias=bool(cfg.get("mlp_bias", False)),
        rope_parameters=rope,
    )


@contextlib.contextmanager
def _building(device, dtype):
    """Construct modules directly on `device` in `dtype` (no float32 copy of a big model)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(old)


def _load(module: nn.Module, ckpt: Checkpoint, prefix: str, skip: tuple[str, ...] = ()) -> None:
    """Strictly load `prefix`+name for every state-dict entry of `module` (except `skip` prefixes)."""
    names = [n for n in module.state_dict() if not n.startswith(skip)]
    tensors = ckpt.read(prefix + n for n in names)
    missing, unexpected = module.load_state_dict({n: tensors[prefix + n] for n in names}, strict=False)
    missing = [m for m in missing if not m.startswith(skip)]
    if missing or unexpected:
        raise RuntimeError(f"{prefix}: missing {missing}, unexpected {unexpected}")


class ReferenceChroma:
    """The slow baseline: one request at a time, eager transformers modules, growing caches."""

    def __init__(self, thinker, backbone, decoder, tensors: dict[str, torch.Tensor], *, num_codebooks: int,
                 eos_id: int, special, default_top_k: int, tokenizer):
        self.thinker, self.backbone, self.decoder = thinker, backbone, decoder
        self.codebook0_head = tensors["backbone.codebook0_head.weight"]  # [V, H]
        self.audio_embedding = tensors["backbone.audio_embedding.embed_audio_tokens.weight"]  # [K*V, H]
        self.projection = tensors["decoder.projection.weight"]  # [Hd, H]
        self.codebook_head = tensors["decoder.codebook_head.weight"]  # [K-1, Hd, V]
        self.audio_vocab = self.codebook0_head.shape[0]
        self.num_codebooks = num_codebooks
        self.eos_id = eos_id
        self.special = special
        self.default_top_k = default_top_k
        self.tokenizer = tokenizer
        self.device = self.codebook0_head.device

    @classmethod
    def from_checkpoint(cls, path, device="cpu", dtype=torch.float32, base_qwen_path=None) -> "ReferenceChroma":
        from transformers import LlamaModel, Qwen2_5OmniThinkerConfig, Qwen2_5OmniThinkerForConditionalGeneration

        from .model.loading import load_parts

        ckpt = Checkpoint(path, base_qwen_path)
        raw = ckpt.config.raw
        thinker_raw = raw.get("thinker_config")
        if not thinker_raw:
            base = json.loads((Path(base_qwen_path) / "config.json").read_text())
            thinker_raw = base.get("thinker_config", base)
        with _building(device, dtype):
            thinker = Qwen2_5OmniThinkerForConditionalGeneration(Qwen2_5OmniThinkerConfig(**thinker_raw))
            backbone = LlamaModel(llama_config(raw["backbone_config"]))
            decoder = LlamaModel(llama_config(raw["decoder_config"]))
        thinker.visual = None  # the vision tower is never used here
        skip: tuple[str, ...] = ()
        if "thinker.lm_head.weight" not in ckpt.weight_map:  # tied output embedding
            thinker.lm_head.weight = thinker.model.embed_tokens.weight
            skip = ("lm_head.",)
        _load(thinker, ckpt, "thinker.", skip=skip)
        for trunk in (backbone, decoder):
            trunk.embed_tokens = nn.Identity()  # fed with inputs_embeds, as upstream's ChromaLlamaModel
        _load(backbone, ckpt, "backbone.model.")
        _load(decoder, ckpt, "decoder.model.")
        names = ["backbone.codebook0_head.weight", "backbone.audio_embedding.embed_audio_tokens.weight",
                 "decoder.projection.weight", "decoder.codebook_head.weight"]
        tensors = {k: v.to(device=device, dtype=dtype) for k, v in ckpt.read(names).items()}
        parts = load_parts(path, base_qwen_path=base_qwen_path, parts={"tokenizer"})
        return cls(thinker.eval(), backbone.eval(), decoder.eval(), tensors,
                   num_codebooks=ckpt.config.num_codebooks, eos_id=ckpt.config.codebook_eos_id,
                   special=parts.special, default_top_k=parts.top_k, tokenizer=parts.tokenizer)

    # -- the algorithm, one method per step -----------------------------------------------------
    @torch.inference_mode()
    def generate(self, request: GenerationRequest) -> tuple[list[int], np.ndarray, str]:
        """Run DESIGN.md §1 for one request -> (reply text ids, codes [frames, K], finish reason)."""
        from transformers import DynamicCache

        params = request.sampling.validated(self.default_top_k, NO_FRAME_LIMIT)
        thinker_cache, backbone_cache = DynamicCache(), DynamicCache()
        # step 0: thinker prefill -> (h0, t1); backbone prompt + [h0, embed(t1)]
        h, token = self.thinker_prefill(request, thinker_cache)
        text_ids, thinker_done = self._text_token(token, [])
        x = torch.cat([self.backbone_prompt(request), h[None], self.embed_text([token])])
        frames: list[torch.Tensor] = []
        for step in range(params.max_tokens):
            if step > 0:
                x = self.frame_embedding(frames[-1])[None]  # [frame_emb(previous frame)]
                if step % 2 == 0 and not thinker_done:  # text : audio = 1 : 2
                    h, token = self.thinker_step(token, thinker_cache)
                    text_ids, thinker_done = self._text_token(token, text_ids)
                    x = torch.cat([x, h[None], self.embed_text([token])])
            state = self.backbone_forward(x, backbone_cache)
            codes = self.sample_frame(state, params, step)
            if self.is_eos(codes):
                return text_ids, self._stack(frames), "stop"
            frames.append(codes)
        return text_ids, self._stack(frames), "length"

    def thinker_prefill(self, request: GenerationRequest, cache) -> tuple[torch.Tensor, int]:
        """Chat prompt with the audio embeddings at the <|AUDIO|> positions -> (h, greedy next id)."""
        ids = torch.tensor([request.thinker_ids], device=self.device)
        embeds = self.thinker.get_input_embeddings()(ids)
        is_audio = ids[0] == self.special.audio
        if int(is_audio.sum()):
            embeds[0, is_audio] = request.audio_embeds.to(device=self.device, dtype=embeds.dtype)
        out = self.thinker(input_ids=ids, inputs_embeds=embeds, attention_mask=torch.ones_like(ids),
                           past_key_values=cache, use_cache=True, output_hidden_states=True)
        return self._thinker_result(out)

    def thinker_step(self, token: int, cache) -> tuple[torch.Tensor, int]:
        """Feed one reply token -> (h, greedy next id). Positions continue from the cache length."""
        out = self.thinker(input_ids=torch.tensor([[token]], device=self.device), past_key_values=cache,
                           use_cache=True, output_hidden_states=True)
        return self._thinker_result(out)

    def _thinker_result(self, out) -> tuple[torch.Tensor, int]:
        h = out.hidden_states[-1][0, -1]  # last layer, after the final norm
        return h, int(out.logits[0, -1].float().argmax())

    def _text_token(self, token: int, text_ids: list[int]) -> tuple[list[int], bool]:
        """Record a reply token; <|im_end|> ends the reply (its pair is still fed)."""
        if token == self.special.im_end:
            return text_ids, True
        return text_ids + [token], False

    def embed_text(self, ids) -> torch.Tensor:
        return self.thinker.get_input_embeddings()(torch.tensor(ids, device=self.device))

    def frame_embedding(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [K] -> sum of codebook k's rows k * V + code: [H]."""
        offsets = torch.arange(len(codes), device=self.device) * self.audio_vocab
        return self.audio_embedding[codes + offsets].sum(dim=0)

    def backbone_prompt(self, request: GenerationRequest) -> torch.Tensor:
        """[<|text_start|>, transcript, <|text_end|>], one summed embedding per reference frame, a zero vector."""
        text = self.embed_text([self.special.text_start, *request.prompt_text_ids, self.special.text_end])
        codes = torch.tensor(np.array(request.prompt_codes), dtype=torch.long, device=self.device)
        audio = torch.stack([self.frame_embedding(c) for c in codes])
        return torch.cat([text, audio, torch.zeros_like(text[:1])])

    def backbone_forward(self, x: torch.Tensor, cache) -> torch.Tensor:
        """Append embeddings x [L, H] to the backbone; return its last post-norm state [H]."""
        out = self.backbone(inputs_embeds=x[None].to(self.codebook0_head.dtype), past_key_values=cache, use_cache=True)
        return out.last_hidden_state[0, -1]

    def sample_frame(self, state: torch.Tensor, params, frame: int) -> torch.Tensor:
        """Codebook 0 from codebook0_head; codebooks 1..K-1 from the decoder with a fresh cache."""
        from transformers import DynamicCache

        codes = [self._sample(F.linear(state, self.codebook0_head), params, frame, 0)]
        cache = DynamicCache()
        x = torch.stack([state, self.codebook_embedding(codes[0], 0)])  # [backbone state, embed_0(c0)]
        for k in range(1, self.num_codebooks):
            out = self.decoder(inputs_embeds=F.linear(x, self.projection)[None], past_key_values=cache, use_cache=True)
            logits = out.last_hidden_state[0, -1] @ self.codebook_head[k - 1]
            codes.append(self._sample(logits, params, frame, k))
            x = self.codebook_embedding(codes[k], k)[None]
        return torch.stack(codes)

    def codebook_embedding(self, code: torch.Tensor, k: int) -> torch.Tensor:
        return self.audio_embedding[code + k * self.audio_vocab]

    def _sample(self, logits: torch.Tensor, params, frame: int, codebook: int) -> torch.Tensor:
        """Temperature, top-k, top-p, counter-based noise: `FrameModel._sample` for a batch of one."""
        def t(v, dtype):
            return torch.tensor([v], dtype=dtype, device=self.device)

        keys = stream_keys(t(params.seed, torch.long), t(frame, torch.long), codebook)
        return sample(logits[None], t(params.temperature, torch.float32), t(params.top_k, torch.long),
                      t(params.top_p, torch.float32), keys)[0]

    def is_eos(self, codes: torch.Tensor) -> bool:
        """EOS frame: its first K-1 codebooks are all the EOS id (the frame is not emitted)."""
        return bool((codes[: self.num_codebooks - 1] == self.eos_id).all())

    def _stack(self, frames: list[torch.Tensor]) -> np.ndarray:
        if not frames:
            return np.zeros((0, self.num_codebooks), dtype=np.int64)
        return torch.stack(frames).cpu().numpy().astype(np.int64)
