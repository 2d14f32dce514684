"""Serving benchmark helpers (``scripts/bench_serving.py``): stream clients for the frontend (SSE)
and Triton (gRPC), per-stream timing statistics, GPU/Triton-metrics monitoring, and starting the
whole stack through the project's launcher. Client-side only: nothing here loads a model."""
