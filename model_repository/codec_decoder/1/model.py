"""Triton adapter of codec_decoder; the logic is chroma_triton.serving.triton_codec."""

import numpy as np
import triton_python_backend_utils as pb_utils

from chroma_triton.serving import protocol as P
from chroma_triton.serving.cancel_board import CancelBoard
from chroma_triton.serving.model_args import ModelArgs, configure_logging, load_model_parts
from chroma_triton.serving.triton_codec import CodecService


def _input(request, name):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()


class TritonPythonModel:
    def initialize(self, args):
        configure_logging()
        a = ModelArgs.from_triton(args)
        path, parts = load_model_parts(a, {"codec"})
        self.service = CodecService(parts.codec)
        self.board = CancelBoard()
        print(f"[{a.instance_name}] ready on {a.device}: {path}", flush=True)

    def execute(self, requests):
        responses = []
        for request in requests:
            if request.is_cancelled():
                # The client cancelled the ensemble request: tell chroma_lm (it cannot see it).
                key = P.as_text(_input(request, P.STREAM_KEY), P.STREAM_KEY, "")
                if key:
                    self.board.post(key)
                responses.append(pb_utils.InferenceResponse(
                    output_tensors=[pb_utils.Tensor(P.AUDIO, np.zeros(0, np.float32))]))
                continue
            try:
                codes = _input(request, P.AUDIO_CODES)
                context = int(P.as_scalar(_input(request, P.CONTEXT_FRAMES), P.CONTEXT_FRAMES) or 0)
                audio = self.service.decode(codes, context)
                responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(P.AUDIO, audio)]))
            except Exception as exc:  # noqa: BLE001
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(P.error_message(exc))))
        return responses
