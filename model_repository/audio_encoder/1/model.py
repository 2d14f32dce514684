"""Triton adapter of audio_encoder; the logic is chroma_triton.serving.triton_audio_encoder."""

import triton_python_backend_utils as pb_utils

from chroma_triton.serving import protocol as P
from chroma_triton.serving.cancel_board import default_dir
from chroma_triton.serving.gc_pauses import freeze_if_asked
from chroma_triton.serving.model_args import (ModelArgs, configure_logging, input_array, load_model_parts, output_tensor,
                                              resolve_default_voice, tensor_dtype)
from chroma_triton.serving.peer_clips import PeerClips
from chroma_triton.serving.triton_audio_encoder import AudioEncoderService, EncoderInput, features_on_device


class TritonPythonModel:
    def initialize(self, args):
        configure_logging()
        a = ModelArgs.from_triton(args)
        path, parts = load_model_parts(a, {"audio_tower", "codec"})
        voice_path, transcript = resolve_default_voice(a.str("default_voice"))
        shared_mib = a.int("shared_clip_mib", 0)
        if shared_mib < 0:
            raise ValueError(f"shared_clip_mib must be >= 0, got {shared_mib}")
        tower = parts.audio_tower
        peers = (PeerClips.open(default_dir(), a.instance_name, shared_mib << 20,
                                int(parts.config.thinker.text.hidden_size), tower.dtype) if shared_mib else None)
        if peers is not None:
            print(f"[{a.instance_name}] clip embeddings shared through {peers.folder / peers.name}", flush=True)
        self.service = AudioEncoderService(parts, (voice_path.read_bytes(), transcript),
                                           voice_cache_size=a.int("voice_cache_size", 256),
                                           clip_cache_mib=a.int("clip_cache_mib", 1024),
                                           prepare_threads=a.int("prepare_threads", 1),
                                           embeds_dtype=tensor_dtype(a.config, P.AUDIO_EMBEDS), peers=peers)
        self._clip_family = pb_utils.MetricFamily(
            name="chroma_audio_encoder_clips_total", kind=pb_utils.MetricFamily.COUNTER,
            description="User audio clips by how they got their embeddings: embedded (through the audio tower), "
                        "reused (the clip cache had them: a conversation's earlier turn sent again, or the "
                        "same clip twice in one batch) or shared (copied from another instance's ring: "
                        "shared_clip_mib)")
        labels = {"model": a.name, "instance": a.instance_name}
        self.clip_counters = {how: self._clip_family.Metric(labels={**labels, "how": how})
                              for how in self.service.clip_counts()}
        self._stage_family = pb_utils.MetricFamily(
            name="chroma_audio_encoder_seconds_total", kind=pb_utils.MetricFamily.COUNTER,
            description="Seconds of execute()'s work by stage, summed over its threads with prepare_threads > 1: "
                        "voice (the reference voice's hash, cache and Mimi encoding), features (user clips' hash, cache lookup, decoding, resampling and "
                        "log-mel), tower (the audio tower's forward and the copy back), output (the "
                        "embeddings each request gets, in the audio_embeds type)")
        self.stage_counters = {stage: self._stage_family.Metric(labels={**labels, "stage": stage})
                               for stage in self.service.stage_seconds()}
        graphs = parts.audio_tower.use_cuda_graphs(a.int("cuda_graph_windows", 64))
        features = parts.audio_tower.use_device_features(features_on_device(a.str("features_device", "auto")))
        freeze_if_asked(a)  # once loaded, its graphs captured: none of that is garbage
        print(f"[{a.instance_name}] ready on {a.device}: {path}, default voice {voice_path}, {graphs} CUDA graphs, "
              f"log-mels on {features}, embeddings out as {self.service.embeds_dtype}",
              flush=True)

    def execute(self, requests):
        inputs, errors = [], {}
        for i, request in enumerate(requests):
            try:
                prompt_audio = P.as_bytes_list(input_array(request, P.PROMPT_AUDIO))
                inputs.append(EncoderInput(
                    user_audio=P.as_bytes_list(input_array(request, P.USER_AUDIO)),
                    prompt_audio=prompt_audio[0] if prompt_audio else b"",
                    prompt_text=P.as_text(input_array(request, P.PROMPT_TEXT), P.PROMPT_TEXT, "") or "",
                ))
            except Exception as exc:  # noqa: BLE001
                errors[i] = exc
                inputs.append(None)
        valid = [inp for inp in inputs if inp is not None]
        counts, seconds = self.service.clip_counts(), self.service.stage_seconds()
        results = iter(self.service.encode_batch(valid))
        for how, count in self.service.clip_counts().items():
            if count > counts[how]:
                self.clip_counters[how].increment(count - counts[how])
        for stage, spent in self.service.stage_seconds().items():
            if spent > seconds[stage]:
                self.stage_counters[stage].increment(spent - seconds[stage])
        responses = []
        for i, inp in enumerate(inputs):
            result = errors[i] if inp is None else next(results)
            if isinstance(result, Exception):
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(P.error_message(result))))
                continue
            # a batching model: every output keeps the request's batch dimension of 1
            responses.append(pb_utils.InferenceResponse(output_tensors=[
                output_tensor(P.AUDIO_EMBEDS, result.audio_embeds[None]),
                pb_utils.Tensor(P.AUDIO_TOKEN_COUNTS, result.audio_token_counts[None]),
                pb_utils.Tensor(P.PROMPT_CODES, result.prompt_codes[None]),
                pb_utils.Tensor(P.VOICE_TEXT, P.bytes_tensor(result.voice_text)[None]),
            ]))
        return responses

    def finalize(self):
        self.service.close()
