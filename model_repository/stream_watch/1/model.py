"""Triton adapter of stream_watch: posts cancelled streams' keys on the cancel board."""

import numpy as np
import triton_python_backend_utils as pb_utils

from chroma_triton.serving import protocol as P
from chroma_triton.serving.cancel_board import CancelBoard


class TritonPythonModel:
    def initialize(self, args):
        self.board = CancelBoard()

    def execute(self, requests):
        responses = []
        for request in requests:
            if request.is_cancelled():
                tensor = pb_utils.get_input_tensor_by_name(request, P.STREAM_KEY)
                key = P.as_text(None if tensor is None else tensor.as_numpy(), P.STREAM_KEY, "")
                if key:
                    self.board.post(key)
            context = pb_utils.get_input_tensor_by_name(request, P.CONTEXT_FRAMES)
            responses.append(pb_utils.InferenceResponse(
                output_tensors=[pb_utils.Tensor("context_frames_out", context.as_numpy().astype(np.int32))]))
        return responses
