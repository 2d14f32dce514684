"""``python -m openai_frontend --host H --port P --triton-grpc-url URL [options]``."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import tempfile

from .settings import API_KEY_ENV, SETTINGS_ENV, Settings


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, Settings]:
    d = Settings()
    p = argparse.ArgumentParser(prog="python -m openai_frontend", description=__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--triton-grpc-url", default=d.triton_grpc_url, help="Triton's gRPC endpoint, host:port")
    p.add_argument("--workers", type=int, default=1, help="uvicorn worker processes")
    p.add_argument("--http", default="h11", choices=["h11", "httptools"],
                   help="uvicorn's HTTP parser. h11 refuses request headers over 16 KiB; httptools (C, install "
                        "it yourself) has no such limit, so put a proxy that caps headers in front of it; it did "
                        "not serve 256 streams measurably better (docs/benchmarks.md run 48)")
    p.add_argument("--allowed-local-media-path", action="append", default=[], metavar="DIR",
                   help="a folder whose files requests may name by path (repeatable); none: no local files")
    p.add_argument("--api-key", default=argparse.SUPPRESS,
                   help=f"require 'Authorization: Bearer KEY' on /v1/* (default: ${API_KEY_ENV} if set, else none)")
    p.add_argument("--cors-allow-origin", action="append", default=[], metavar="ORIGIN",
                   help="let browser pages from ORIGIN (e.g. https://app.example.com, or *) call the API; repeatable")
    p.add_argument("--model-name", default=d.model_name, help="the model id clients send")
    p.add_argument("--triton-model", default=d.triton_model, help="the Triton ensemble to call")
    p.add_argument("--triton-cancel-model", default=d.triton_cancel_model,
                   help="the Triton control model the frontend calls to cancel an abandoned request in the "
                        "engine at once ('' = rely on the gRPC cancel only)")
    p.add_argument("--voices-dir", default=d.voices_dir, help="named voices: <name>.wav + <name>.txt pairs")
    p.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes)
    p.add_argument("--max-audio-seconds", type=float, default=d.max_audio_seconds,
                   help="user audio per request, in all")
    p.add_argument("--max-prompt-audio-seconds", type=float, default=d.max_prompt_audio_seconds)
    p.add_argument("--max-tokens-limit", type=int, default=d.max_tokens_limit, help="largest max_tokens (frames)")
    p.add_argument("--request-timeout", type=float, default=d.request_timeout,
                   help="seconds one request may take in all (then 504)")
    p.add_argument("--slow-client-timeout", type=float, default=d.slow_client_timeout,
                   help="seconds a streamed event may wait for a client that does not read before the "
                        "reply is abandoned (Triton request cancelled, connection closed); 0 = never")
    p.add_argument("--start-timeout", type=float, default=d.start_timeout,
                   help="seconds a reply may take to start (waiting for a generation row) before the request "
                        "gets 429 server_busy and is cancelled; 0 = never")
    p.add_argument("--conversation-idle-s", type=float, default=d.conversation_idle_s,
                   help="for a Triton whose chroma_lm keeps conversations together (the launcher's "
                        "--conversation-affinity on): its idle timeout (--conversation-idle-s); requests then name "
                        "their conversations, and one not named for that long starts again; 0 (default): off")
    p.add_argument("--log-level", default=d.log_level, choices=["debug", "info", "warning", "error"])
    args = p.parse_args(argv)
    if args.workers < 1:
        p.error("--workers must be >= 1")
    try:
        settings = Settings(
            triton_grpc_url=args.triton_grpc_url,
            triton_model=args.triton_model,
            triton_cancel_model=args.triton_cancel_model,
            model_name=args.model_name,
            allowed_local_media_paths=tuple(os.path.abspath(path) for path in args.allowed_local_media_path),
            voices_dir=args.voices_dir,
            api_key=getattr(args, "api_key", None) or os.environ.get(API_KEY_ENV) or None,
            cors_allow_origins=tuple(args.cors_allow_origin),
            max_body_bytes=args.max_body_bytes,
            max_audio_seconds=args.max_audio_seconds,
            max_prompt_audio_seconds=args.max_prompt_audio_seconds,
            max_tokens_limit=args.max_tokens_limit,
            default_max_tokens=min(Settings.default_max_tokens, args.max_tokens_limit),
            request_timeout=args.request_timeout,
            slow_client_timeout=args.slow_client_timeout,
            start_timeout=args.start_timeout,
            conversation_idle_s=args.conversation_idle_s,
            log_level=args.log_level,
        )
    except ValueError as exc:
        p.error(str(exc))
    return args, settings


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    from .app import configure_logging, create_app, tune_malloc

    args, settings = parse_args(argv)
    configure_logging(settings.log_level)
    tune_malloc()
    with contextlib.ExitStack() as cleanup:
        if args.workers > 1 and settings.transcript_db is None:
            # a reply's transcript must be found by whichever worker takes the next turn
            folder = cleanup.enter_context(tempfile.TemporaryDirectory(prefix="chroma-frontend-"))
            settings = dataclasses.replace(settings, transcript_db=os.path.join(folder, "transcripts.sqlite3"))
        try:
            app = create_app(settings)  # also validates folders and voices before any worker starts
        except ValueError as exc:
            raise SystemExit(f"openai_frontend: {exc}") from None
        common = dict(host=args.host, port=args.port, http=args.http, log_config=None, access_log=False,
                      timeout_graceful_shutdown=5, log_level=settings.log_level)
        if args.workers == 1:
            uvicorn.run(app, **common)
        else:
            os.environ[SETTINGS_ENV] = settings.to_env()
            uvicorn.run("openai_frontend.app:app_from_env", factory=True, workers=args.workers, **common)


if __name__ == "__main__":
    main()
