"""Render a deployable copy of ``model_repository/``: checkpoint paths, instance groups (one
``chroma_lm`` instance per GPU, or the CPU) and any parameter overrides go into the copied
``config.pbtxt`` files; the ``model.py`` adapters are copied as they are.

Configs are parsed and written with Triton's own ``ModelConfig`` protobuf (shipped in
tritonclient), so a rendered file is exactly what tritonserver will read.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from .affinity import sequence_batching

PROJECT_ROOT = Path(__file__).resolve().parents[2]
SOURCE_REPOSITORY = PROJECT_ROOT / "model_repository"
MODELS = ("audio_encoder", "chroma_lm", "codec_decoder", "stream_watch", "chroma", "chroma_cancel")
CHECKPOINT_MODELS = ("audio_encoder", "chroma_lm", "codec_decoder")


@dataclass
class RenderSpec:
    model_path: str = ""
    base_qwen_path: str = ""
    kind: str = "cpu"  # "gpu" or "cpu"
    dp_size: int = 1
    params: dict[str, dict[str, str]] = field(default_factory=dict)  # model -> key -> value
    embeds_dtype: str = "auto"  # audio_embeds between audio_encoder and chroma_lm: auto, fp32 or bf16
    # > 0: chroma_lm gets a sequence batcher that keeps a conversation's turns on one instance for
    # this many seconds after its latest request (serving/affinity.py); 0: Triton picks any instance
    conversation_idle_s: float = 0.0


#: ``RenderSpec.embeds_dtype`` -> the Triton type of ``audio_embeds``; ``auto`` is the models' own
#: dtype: bf16 on GPUs (the tower computes and the thinker reads bf16, so nothing is rounded and the
#: bytes copied between the processes halve: 11 MB as float32 for a conversation's 8 clips of 97
#: rows x 3,584), float32 on the CPU (bf16 there would round the tower's float32 output)
EMBEDS_DTYPES = {"fp32": "TYPE_FP32", "bf16": "TYPE_BF16"}


def _pb():
    try:
        from google.protobuf import text_format
        from tritonclient.grpc import model_config_pb2
    except ImportError as exc:  # pragma: no cover - the serve extra brings both
        raise RuntimeError(f"rendering configs needs tritonclient[grpc] and protobuf ({exc}); "
                           "install the project's [serve] extra") from None
    return text_format, model_config_pb2


def parse_config(text: str):
    text_format, pb = _pb()
    return text_format.Parse(text, pb.ModelConfig())


def format_config(config) -> str:
    text_format, _ = _pb()
    return text_format.MessageToString(config)


def render_config(name: str, text: str, spec: RenderSpec) -> str:
    """Edit the hand-written config as text (comments stay), then check it parses as a ModelConfig."""
    if name in CHECKPOINT_MODELS:
        text = _set_param(name, text, "model_path", spec.model_path)
        text = _set_param(name, text, "base_qwen_path", spec.base_qwen_path)
        text = _set_instance_group(name, text, spec)
    if name in CPU_UNBATCHED and spec.kind != "gpu":
        text = _DYNAMIC_BATCHING.sub("", text, count=1)
    if name in EMBEDS_MODELS:
        text = _set_embeds_dtype(name, text, embeds_type(spec))
    if name == AFFINITY_MODEL and spec.conversation_idle_s:
        text = _add_sequence_batching(name, text, spec.conversation_idle_s)
    if spec.kind != "gpu":
        for key, value in CPU_PARAMS.get(name, {}).items():
            text = _set_param(name, text, key, value)
    elif spec.dp_size > 1:
        for key, value in MULTI_GPU_PARAMS.get(name, {}).items():
            text = _set_param(name, text, key, value)
    for key, value in spec.params.get(name, {}).items():
        text = _set_param(name, text, key, value)
    config = parse_config(text)
    if config.name != name:
        raise ValueError(f"{name}/config.pbtxt names the model {config.name!r}")
    return text


# On the CPU, codec_decoder decodes one chunk per execute: batching Mimi buys no throughput on a
# CPU and makes every chunk of a batch wait for the whole batch. Measured in the 200-stream soak
# (1000-frame leavers, 2 cores): with the dynamic batcher the rounds took 28, 32, 49, 92 s, the
# backlog growing each round; without it 22, 23, 26, 36 s. The tensor shapes stay the same.
CPU_UNBATCHED = ("codec_decoder",)
_DYNAMIC_BATCHING = re.compile(r"^dynamic_batching \{.*?^\}\n", re.S | re.M)

# On the CPU, chroma_lm's steps are slow and Mimi decoding shares the cores: a thread per request
# relays its events (the shared relay thread, the GPU default, let the engine run ahead of
# delivery), and chunks double as they go (start_slack_s keeps them small while steps are slow,
# so every stream makes many more responses). Measured in the 200-stream soak (2 cores, 30 % of
# clients hanging up): with the GPU defaults the rounds took 22, 37, 46 s and the hung-up requests
# had ended before their clients left (40, 0, 0 of 60 cancelled); with these 17, 16, 13 s and 60 of
# 60 cancelled each round (docs/reliability.md section 2d). Explicit parameters still win. (Either
# relay mode submits a request before chroma_lm's execute returns, so hold_when_full holds with both.)
CPU_PARAMS = {"chroma_lm": {"relays": "per_request", "start_slack_s": "0"}}

# With one codec_decoder instance per GPU, a stream's chunks reach both instances (Triton hands a
# batch to whichever is free): the instances share their streams' SEANet states through host
# memory (serving/peer_states.py), so a chunk continues where the other instance left its stream
# instead of decoding its context again. 1024 streams per instance: 28 MiB of /dev/shm each.
# A conversation's turns reach either chroma_lm instance too: each copies the stored prompts it
# lacks from the other's thinker prefix cache (engine/peer_prefixes.py) instead of prefilling them;
# and either audio_encoder instance: each copies the clip embeddings it lacks from the others'
# rings (serving/peer_clips.py, 1 GiB of /dev/shm each) instead of embedding them again.
# Explicit parameters still win.
MULTI_GPU_PARAMS = {"codec_decoder": {"shared_stream_states": "1024"},
                    "chroma_lm": {"shared_thinker_prefixes": "true"},
                    "audio_encoder": {"shared_clip_mib": "1024"}}

EMBEDS_MODELS = ("audio_encoder", "chroma_lm")  # its output, its input
_EMBEDS = re.compile(r'(name:\s*"audio_embeds"\s*data_type:\s*)TYPE_\w+')


def embeds_type(spec: RenderSpec) -> str:
    """The Triton type ``audio_embeds`` gets under ``spec``."""
    if spec.embeds_dtype == "auto":
        return EMBEDS_DTYPES["bf16" if spec.kind == "gpu" else "fp32"]
    if spec.embeds_dtype not in EMBEDS_DTYPES:
        raise ValueError(f"audio_embeds dtype must be auto, {' or '.join(EMBEDS_DTYPES)}, got {spec.embeds_dtype!r}")
    return EMBEDS_DTYPES[spec.embeds_dtype]


def _set_embeds_dtype(name: str, text: str, triton_type: str) -> str:
    text, found = _EMBEDS.subn(lambda m: m.group(1) + triton_type, text)
    if found != 1:
        raise ValueError(f"model {name}: config should declare audio_embeds' data_type once, found {found}")
    return text


_PARAM = r'parameters:\s*\{\s*key:\s*"%s"\s*value:\s*\{\s*string_value:\s*"(?:[^"\\]|\\.)*"\s*\}\s*\}'
_GROUP = re.compile(r"^instance_group \[.*?^\]", re.S | re.M)


def _quote(value: str) -> str:
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _set_param(name: str, text: str, key: str, value: str) -> str:
    pattern = re.compile(_PARAM % re.escape(key))
    if not pattern.search(text):
        known = ", ".join(sorted(re.findall(r'parameters:\s*\{\s*key:\s*"([^"]+)"', text))) or "none"
        raise ValueError(f"model {name} has no parameter {key!r} (known: {known})")
    line = f"parameters: {{ key: {_quote(key)} value: {{ string_value: {_quote(value)} }} }}"
    return pattern.sub(lambda _: line, text, count=1)


def _set_instance_group(name: str, text: str, spec: RenderSpec) -> str:
    if spec.kind == "gpu":
        gpus = ", ".join(str(i) for i in range(spec.dp_size))
        group = f"instance_group [\n  {{\n    count: 1\n    kind: KIND_GPU\n    gpus: [{gpus}]\n  }}\n]"
    else:
        group = "instance_group [\n  {\n    count: 1\n    kind: KIND_CPU\n  }\n]"
    if not _GROUP.search(text):
        raise ValueError(f"model {name}: config has no top-level 'instance_group [ ... ]' block to render")
    return _GROUP.sub(lambda _: group, text, count=1)


AFFINITY_MODEL = "chroma_lm"


def _add_sequence_batching(name: str, text: str, idle_s: float) -> str:
    """Put the sequence batcher (conversation affinity) in front of the instance group."""
    if re.search(r"^sequence_batching\b", text, re.M):
        raise ValueError(f"model {name}: config already has a sequence_batching block")
    match = _GROUP.search(text)
    if match is None:
        raise ValueError(f"model {name}: config has no top-level 'instance_group [ ... ]' block")
    return text[:match.start()] + sequence_batching(idle_s) + text[match.start():]


def render_repository(dst: Path, spec: RenderSpec, src: Path = SOURCE_REPOSITORY) -> dict[str, str]:
    """Write the rendered repository to ``dst`` (replacing what is there); return name -> config."""
    configs = render_configs(spec, src)
    dst = Path(dst)
    if dst.exists():
        shutil.rmtree(dst)
    for name, text in configs.items():
        shutil.copytree(src / name, dst / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        (dst / name / "config.pbtxt").write_text(text)
    return configs


def render_configs(spec: RenderSpec, src: Path = SOURCE_REPOSITORY) -> dict[str, str]:
    unknown = set(spec.params) - set(MODELS)
    if unknown:
        raise ValueError(f"unknown model(s) {sorted(unknown)} in parameter overrides; models: {', '.join(MODELS)}")
    missing = [m for m in MODELS if not (Path(src) / m / "config.pbtxt").is_file()]
    if missing:
        raise FileNotFoundError(f"{src} lacks {missing}: not a chroma model repository")
    return {name: render_config(name, (Path(src) / name / "config.pbtxt").read_text(), spec) for name in MODELS}
