"""Fuzz the frontend through its own OpenAPI schema with schemathesis (its CLI, all phases that
apply: the schema's examples, coverage of boundaries and every schema keyword, and random
fuzzing; positive and negative cases; every operation), then summarise its NDJSON report.

Pass criteria: no 5xx and no request without an answer within ``--request-timeout`` (hung);
besides, every schemathesis check except ``positive_data_acceptance`` is run and reported (a
schema-valid request may still be refused: an unknown voice, audio that is not base64, ...).

Chat bodies get ``model: "chroma"`` 4 times in 5 (``schemathesis_hooks.py``), so that cases get
past the model check; the stack runs with ``--max-tokens-limit 40`` so that the replies stay short.

    python scripts/reliability/fuzz.py --max-examples 250 --report out/fuzz.json   # starts its own stack
    python scripts/reliability/fuzz.py --url http://127.0.0.1:8000 --max-examples 20  # a running frontend
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import (RunInfo, default_frontend_args, exit_on_sigterm, git_revision, http_get, start_stack,  # noqa: E402
                    wait_idle, write_report)

FUZZ_FRONTEND_ARGS = ("--max-tokens-limit", "40")
EXCLUDED_CHECKS = ("positive_data_acceptance",)


def run_schemathesis(url: str, report_dir: Path, *, max_examples: int, request_timeout: float = 60.0,
                     seed: int = 0, workers: int = 1, phases: str = "examples,coverage,fuzzing",
                     extra: tuple[str, ...] = (), timeout: float | None = None) -> tuple[int, str, Path]:
    """Run ``schemathesis run`` against ``url``; (exit code, console output, NDJSON report)."""
    report_dir = Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    cli = Path(sys.executable).with_name("schemathesis")
    cmd = [str(cli) if cli.exists() else "schemathesis", "run", f"{url}/openapi.json",
           "--checks", "all", "--exclude-checks", ",".join(EXCLUDED_CHECKS),
           "--phases", phases, "--max-examples", str(max_examples), "--seed", str(seed),
           "--request-timeout", str(request_timeout), "--max-response-time", str(request_timeout),
           "--workers", str(workers),
           "--suppress-health-check", "all", "--report", "ndjson", "--report-dir", str(report_dir), *extra]
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "schemathesis_hooks", "NO_PROXY": "*", "NO_COLOR": "1",
           "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy"):
        env.pop(name, None)  # loopback only
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=report_dir, timeout=timeout)
    reports = sorted(report_dir.glob("*.ndjson"), key=lambda p: p.stat().st_mtime)
    if not reports:
        raise RuntimeError(f"schemathesis wrote no report (exit {done.returncode}):\n{done.stdout[-3000:]}\n"
                           f"{done.stderr[-3000:]}")
    return done.returncode, done.stdout + done.stderr, reports[-1]


def summarize(ndjson: Path) -> dict:
    """Counts from schemathesis' NDJSON events: cases by operation/mode/phase/status, 5xx,
    requests without an answer, failed checks."""
    cases: dict[str, dict] = {}
    statuses: dict[str, int | None] = {}
    failed_checks: dict[str, list] = collections.defaultdict(list)
    errors: list[str] = []
    slowest = 0.0
    for line in ndjson.read_text().splitlines():
        event = json.loads(line)
        name, data = next(iter(event.items()))
        if name == "NonFatalError":
            errors.append(json.dumps(data)[:500])
            continue
        if name != "ScenarioFinished":
            continue
        recorder = data.get("recorder") or {}
        label = recorder.get("label", "?")
        for case_id, case in (recorder.get("cases") or {}).items():
            value = case.get("value", {})
            meta = value.get("meta") or {}
            cases[case_id] = {"label": label, "mode": (meta.get("generation") or {}).get("mode"),
                              "phase": (meta.get("phase") or {}).get("name"), "body": value.get("body")}
        for case_id, interaction in (recorder.get("interactions") or {}).items():
            response = interaction.get("response")
            statuses[case_id] = response.get("status_code") if response else None
            if response and response.get("elapsed") is not None:
                slowest = max(slowest, float(response["elapsed"]))
        for case_id, checks in (recorder.get("checks") or {}).items():
            for check in checks:
                if check.get("status") != "success":
                    failed_checks[check["name"]].append(case_id)
    answered = {cid: s for cid, s in statuses.items() if s is not None}
    server_errors = [cid for cid, s in answered.items() if s >= 500]

    def example(cid: str) -> dict:
        case = cases.get(cid, {})
        return {"case": cid, "operation": case.get("label"), "mode": case.get("mode"), "status": statuses.get(cid),
                "body": str(case.get("body"))[:300]}

    by = lambda key: dict(collections.Counter(str(cases[c][key]) for c in statuses if c in cases))  # noqa: E731
    return {
        "cases": len(statuses),
        "by_operation": by("label"),
        "by_mode": by("mode"),
        "by_phase": by("phase"),
        "by_status": {str(k): v for k, v in sorted(collections.Counter(answered.values()).items())},
        "server_errors_5xx": len(server_errors),
        "no_answer": len(statuses) - len(answered),
        "network_errors": len(errors),
        "slowest_response_s": round(slowest, 2),
        "failed_checks": {name: len(ids) for name, ids in failed_checks.items()},
        "examples": {"server_errors": [example(c) for c in server_errors[:10]],
                     "no_answer": [example(c) for c, s in statuses.items() if s is None][:10],
                     "failed_checks": {name: [example(c) for c in ids[:3]] for name, ids in failed_checks.items()},
                     "network_errors": errors[:5]},
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", help="fuzz this running frontend instead of starting a stack")
    p.add_argument("--max-examples", type=int, default=250, help="schemathesis --max-examples (per operation and phase)")
    p.add_argument("--min-cases", type=int, default=500, help="fail when fewer cases than this were run")
    p.add_argument("--request-timeout", type=float, default=60.0, help="a request without an answer by then is hung")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--workdir", default=None)
    p.add_argument("--report", default=None, help="write the JSON summary here too")
    args = p.parse_args(argv)
    exit_on_sigterm()
    info = RunInfo.now()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="chroma-fuzz-"))
    stack = None
    url = args.url
    if url is None:
        stack = start_stack(workdir, frontend_args=default_frontend_args(*FUZZ_FRONTEND_ARGS))
        url = stack.frontend.url
        print(f"stack up: frontend {url}, Triton {stack.triton.grpc_url}; logs in {workdir}", flush=True)
    try:
        t0 = time.monotonic()
        code, output, ndjson = run_schemathesis(url, workdir / "schemathesis", max_examples=args.max_examples,
                                                request_timeout=args.request_timeout, seed=args.seed,
                                                workers=args.workers)
        summary = summarize(ndjson)
        summary["seconds"] = round(time.monotonic() - t0, 1)
        summary["schemathesis_exit_code"] = code
        summary["schemathesis_summary"] = output[output.rfind("SUMMARY"):][:3000] if "SUMMARY" in output else output[-3000:]
        report = {"run": vars(info), "revision": git_revision(), "ndjson": str(ndjson), "fuzz": summary}
        if stack is not None:
            report["engine_after"] = wait_idle(stack.triton.metrics_url)
            report["health_after"] = http_get(f"{url}/health")[0]
        problems = []
        if summary["server_errors_5xx"]:
            problems.append(f"{summary['server_errors_5xx']} responses were 5xx")
        if summary["no_answer"] or summary["network_errors"]:
            problems.append(f"{summary['no_answer']} requests got no answer ({summary['network_errors']} network errors)")
        if summary["cases"] < args.min_cases:
            problems.append(f"only {summary['cases']} cases ran (want >= {args.min_cases})")
        report["problems"] = problems
        write_report(args.report, report)
    finally:
        if stack is not None:
            stack.stop()
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
