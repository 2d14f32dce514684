"""Triton adapter of chroma_cancel: posts cancel markers on the board chroma_lm watches
(chroma_triton.serving.cancel_board). Loads no model."""

import numpy as np
import triton_python_backend_utils as pb_utils

from chroma_triton.errors import InvalidRequestError
from chroma_triton.serving import protocol as P
from chroma_triton.serving.cancel_board import CancelBoard
from chroma_triton.serving.model_args import configure_logging, input_array


class TritonPythonModel:
    def initialize(self, args):
        configure_logging()
        self.board = CancelBoard()

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                values = input_array(request, "request_id")
                ids = [] if values is None else [P.as_text(np.asarray([v], dtype=object), "request_id")
                                                 for v in values.reshape(-1)]
                if not ids or any(not i for i in ids):
                    raise InvalidRequestError("request_id must hold one or more non-empty request ids", "request_id")
                running = np.array([self.board.cancel_request(i) for i in ids], dtype=bool)
                responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("running", running)]))
            except Exception as exc:  # noqa: BLE001
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(P.error_message(exc))))
        return responses
