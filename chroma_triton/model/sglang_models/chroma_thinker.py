"""`ChromaThinkerForCausalLM`: the Chroma (Qwen2.5-Omni) thinker's language model for SGLang.

Runs in SGLang's scheduler process. It is SGLang's own Qwen2 model (q/k/v biases, RMSNorm, SiLU
MLP, 1-D rope: Qwen2.5-Omni's mrope is ordinary rope over text and audio positions) with three
additions:

* weights come straight from the Chroma checkpoint: only ``thinker.model.*`` and
  ``thinker.lm_head.*`` are taken (prefix stripped); the audio tower, the vision tower, the
  backbone, the decoder and the codec are skipped;
* the user's speech enters as audio-tower embeddings placed at the ``<|AUDIO|>`` positions
  (SGLang's ``positional_embed_overrides``, which also keeps those prompts out of the prefix cache);
* every forward publishes each token's post-norm hidden state into the GPU buffer shared by
  `SGLangThinker` (CUDA IPC): ``hidden[slot, position - base]``. Prefill (eager) maps SGLang's
  request-pool index to (slot, base) parsed from the request id; decode (inside SGLang's CUDA
  graph) only gathers that map and scatters, with no host sync.
"""

from __future__ import annotations

import logging
import os
from typing import Iterable

import torch
from sglang.srt.models.qwen2 import Qwen2ForCausalLM

from chroma_triton.model.sglang_thinker import ENV_SHARE, THINKER_LM_PREFIXES, load_shared, parse_rid, scatter_hidden

log = logging.getLogger(__name__)

POOL_MAP_SIZE = int(os.environ.get("CHROMA_SGLANG_POOL_MAP", "65536"))  # > SGLang's request-pool size


class _Publisher:
    def __init__(self, path: str):
        shared = load_shared(path)
        self.tag: str = shared["tag"]
        self.hidden: torch.Tensor = shared["hidden"]
        device = self.hidden.device
        # request-pool index -> (slot, base); -1: not ours. Index 0 is SGLang's padding entry.
        self.pool_map = torch.full((POOL_MAP_SIZE, 2), -1, dtype=torch.long, device=device)
        log.info("chroma thinker: publishing hidden states into %s %s (tag %s)", tuple(self.hidden.shape),
                 self.hidden.dtype, self.tag)

    def publish(self, hidden: torch.Tensor, positions: torch.Tensor, fb) -> None:
        n = hidden.shape[0]
        if n == 0 or fb is None:
            return
        mode = fb.forward_mode
        pool = fb.req_pool_indices
        if mode.is_extend():  # eager: learn the new requests' slots from their ids
            if fb.rids is None or fb.extend_seq_lens is None or pool is None:
                return
            meta = torch.tensor([parse_rid(r, self.tag) for r in fb.rids], dtype=torch.long)
            self.pool_map[pool.long()] = meta.to(pool.device, non_blocking=True)
            token_pool = torch.repeat_interleave(pool.long(), fb.extend_seq_lens.long(), output_size=n)
        elif mode.is_decode() and pool is not None and pool.shape[0] == n:  # also inside the CUDA graph
            token_pool = pool.long()
        else:
            return
        m = self.pool_map[token_pool]
        scatter_hidden(self.hidden, hidden, m[:, 0], m[:, 1], positions[:n])


class ChromaThinkerForCausalLM(Qwen2ForCausalLM):
    def __init__(self, config, quant_config=None, prefix: str = ""):
        super().__init__(config, quant_config=quant_config, prefix=prefix)
        path = os.environ.get(ENV_SHARE)
        self.chroma_publisher = _Publisher(path) if path else None

    @torch.no_grad()
    def forward(self, input_ids, positions, forward_batch, input_embeds=None, get_embedding: bool = False,
                pp_proxy_tensors=None):
        hidden = self.model(input_ids, positions, forward_batch, input_embeds, pp_proxy_tensors=pp_proxy_tensors)
        if not self.pp_group.is_last_rank:
            return hidden
        if self.chroma_publisher is not None:
            self.chroma_publisher.publish(hidden, positions, forward_batch)
        if get_embedding:
            return self.pooler(hidden, forward_batch)
        return self.logits_processor(input_ids, hidden, self.lm_head, forward_batch)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]):
        def thinker_lm():
            n = 0
            for name, tensor in weights:
                if name.startswith(THINKER_LM_PREFIXES):
                    n += 1
                    yield name[len("thinker."):], tensor
            log.info("chroma thinker: %d thinker LM tensors loaded from the Chroma checkpoint", n)

        return super().load_weights(thinker_lm())


EntryClass = ChromaThinkerForCausalLM
