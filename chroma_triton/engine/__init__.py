from .engine import ChromaEngine, EngineOptions
from .request import AudioChunk, Finished, GenerationRequest, RequestFailed, RequestStream, SamplingParams, TextDelta

__all__ = [
    "AudioChunk", "ChromaEngine", "EngineOptions", "Finished", "GenerationRequest", "RequestFailed",
    "RequestStream", "SamplingParams", "TextDelta",
]
