"""Triton adapter of stream_watch: posts cancelled streams' keys on the cancel board."""

import numpy as np
import triton_python_backend_utils as pb_utils

from chroma_triton.serving import protocol as P
from chroma_triton.serving.cancel_board import CancelBoard
from chroma_triton.serving.model_args import input_array


class TritonPythonModel:
    def initialize(self, args):
        self.board = CancelBoard()

    def execute(self, requests):
        responses = []
        for request in requests:
            if request.is_cancelled():
                key = P.as_text(input_array(request, P.STREAM_KEY), P.STREAM_KEY, "")
                if key:
                    self.board.post(key)
            context = input_array(request, P.CONTEXT_FRAMES).astype(np.int32)
            responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("context_frames_out", context)]))
        return responses
