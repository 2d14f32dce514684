"""OpenAI-compatible REST frontend for Chroma served by Triton (``python -m openai_frontend``).

The frontend validates requests, gathers their audio, streams them to the Triton ensemble
``chroma`` over gRPC, and encodes the reply audio; it never loads torch or a model.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("chroma-triton")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"

__all__ = ["__version__"]
