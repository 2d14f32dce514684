"""Serving helpers: running a real Triton Inference Server and the Triton model code."""

from chroma_triton.serving.tritonserver import (
    TritonInstall,
    TritonServer,
    TritonServerError,
    find_tritonserver,
    free_port,
    is_port_free,
)

__all__ = [
    "TritonInstall",
    "TritonServer",
    "TritonServerError",
    "find_tritonserver",
    "free_port",
    "is_port_free",
]
