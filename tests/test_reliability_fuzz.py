"""A fast subset of the schemathesis fuzzing (``scripts/reliability/fuzz.py`` runs the full one):
the schemathesis CLI against the frontend's OpenAPI schema, every operation, positive and
negative cases from the schema's examples, its coverage phase and random fuzzing, against the
real stack (tritonserver with the demo checkpoint, a frontend with ``--max-tokens-limit 40``).

No 5xx, no request without an answer, and every schemathesis check (except
``positive_data_acceptance``: a schema-valid request may still name an unknown voice, ...) passes.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from openai_frontend.testing import FrontendProcess

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts" / "reliability"))

from fuzz import FUZZ_FRONTEND_ARGS, run_schemathesis, summarize  # noqa: E402

pytestmark = pytest.mark.triton
ASSETS = Path(__file__).resolve().parent.parent / "assets"


@pytest.fixture(scope="module")
def frontend(stack, tmp_path_factory):
    args = ["--allowed-local-media-path", str(ASSETS), "--request-timeout", "60", *FUZZ_FRONTEND_ARGS]
    process = FrontendProcess(stack.triton.grpc_url, args=args,
                              log_file=tmp_path_factory.mktemp("fuzz") / "frontend.log")
    with process.start(wait_ready=True):
        yield process


def test_schemathesis_finds_no_server_error_and_no_hang(frontend, tmp_path):
    code, output, ndjson = run_schemathesis(frontend.url, tmp_path, max_examples=8, request_timeout=30, timeout=300)
    summary = summarize(ndjson)
    assert summary["cases"] >= 100, summary
    assert set(summary["by_operation"]) == {"GET /", "GET /health", "GET /v1/models", "GET /v1/models/{model_id}",
                                            "GET /v1/voices", "POST /v1/chat/completions"}, summary
    assert summary["by_mode"].get("negative", 0) >= 50 and summary["by_mode"].get("positive", 0) >= 20, summary
    assert summary["server_errors_5xx"] == 0, summary["examples"]["server_errors"]
    assert summary["no_answer"] == 0 and summary["network_errors"] == 0, summary["examples"]
    assert summary["failed_checks"] == {}, summary["examples"]["failed_checks"]
    assert code == 0, output[-3000:]
    assert "200" in summary["by_status"], summary  # some cases got through to the engine
