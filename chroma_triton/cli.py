"""Command line: `python -m chroma_triton generate ...` (one conversation, no server) and
`python -m chroma_triton make-checkpoint ...` (random checkpoint in the real layout)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from .errors import ChromaError

log = logging.getLogger("chroma_triton")


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate one reply (text + speech) from files")
    p.add_argument("--model", help="Chroma checkpoint folder or hub id (default: the tiny demo checkpoint, noise)")
    p.add_argument("--base-qwen-path", help="Qwen2.5-Omni folder for thinker config/tokenizer/feature extractor")
    p.add_argument("--audio", action="append", default=[], help="user speech file (repeatable)")
    p.add_argument("--text", help="user text (after the audio, in the same message)")
    p.add_argument("--system", help="system prompt (default: 'You are a helpful assistant.')")
    p.add_argument("--prompt-audio", help="reference voice clip (default: assets/voices/default.wav)")
    p.add_argument("--prompt-text", help="transcript of --prompt-audio (required with it)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--max-tokens", type=int, default=1000, help="max audio frames (80 ms each)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=None, help="default: the checkpoint's generation_config (or 50)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ...")
    p.add_argument("--out", required=True, help="output audio file (.wav, .flac, .mp3)")


def _add_make_checkpoint(sub) -> None:
    p = sub.add_parser("make-checkpoint", help="write a random-weight checkpoint in the real Chroma layout")
    p.add_argument("--preset", choices=["tiny", "full"], default="tiny")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    p.add_argument("--no-visual", action="store_true", help="omit thinker.visual.* (unused by Chroma)")


def _generate(args) -> dict:
    from .audio_io import encode_audio
    from .demo import ASSETS, DEMO_WARNING, demo_checkpoint
    from .engine import EngineOptions, SamplingParams
    from .pipeline import ChromaPipeline

    if (args.prompt_audio is None) != (args.prompt_text is None):
        raise SystemExit("error: --prompt-audio and --prompt-text go together (give both, or neither for the default voice)")
    if not args.audio and not args.text:
        raise SystemExit("error: give the user's turn with --audio and/or --text")
    model = args.model
    if model is None:
        print(f"WARNING: {DEMO_WARNING}", file=sys.stderr)
        model = demo_checkpoint()
    prompt_audio = Path(args.prompt_audio) if args.prompt_audio else ASSETS / "voices" / "default.wav"
    prompt_text = args.prompt_text if args.prompt_text else (ASSETS / "voices" / "default.txt").read_text().strip()
    content = [{"type": "audio", "audio": str(a)} for a in args.audio]
    if args.text:
        content.append({"type": "text", "text": args.text})
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + [{"role": "user", "content": content}]
    sampling = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                              max_tokens=args.max_tokens)
    fmt = Path(args.out).suffix.lstrip(".").lower() or "wav"
    pipe = ChromaPipeline.from_pretrained(model, base_qwen_path=args.base_qwen_path, device=args.device,
                                          options=EngineOptions(max_batch=1, max_frames=max(args.max_tokens, 1)))
    try:
        result = pipe.generate(messages, prompt_audio.read_bytes(), prompt_text, sampling)
    finally:
        pipe.close()
    Path(args.out).write_bytes(encode_audio(result.audio, result.sample_rate, fmt))
    return {"text": result.text, "audio_seconds": round(result.audio_seconds, 3), "frames": result.frames,
            "finish_reason": result.finish_reason, "out": args.out}


def _make_checkpoint(args) -> dict:
    from .checkpoint.factory import make_checkpoint

    out = make_checkpoint(args.out, args.preset, args.seed, with_visual=not args.no_visual)
    return {"checkpoint": str(out), "preset": args.preset, "seed": args.seed}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m chroma_triton", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_generate(sub)
    _add_make_checkpoint(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        result = _generate(args) if args.command == "generate" else _make_checkpoint(args)
    except (ChromaError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result, ensure_ascii=False))
    return 0
