"""What a Triton Python model learns from ``initialize(args)``: its config parameters, its device,
and the checkpoint it serves; and how it reads a request's inputs. Shared by the model.py
adapters; no Triton import at module level (unit-testable)."""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

DEFAULT_VOICE = "assets/voices/default.wav"
THINKER_BACKENDS = ("auto", "torch", "sglang")


@dataclass
class ModelArgs:
    name: str
    config: dict
    params: dict[str, str]
    device: str  # "cpu" or "cuda:<id>"
    instance_name: str

    @classmethod
    def from_triton(cls, args: dict) -> "ModelArgs":
        config = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in (config.get("parameters") or {}).items()}
        kind = str(args.get("model_instance_kind", "CPU")).upper()
        device = f"cuda:{int(args.get('model_instance_device_id', 0))}" if kind == "GPU" else "cpu"
        return cls(config["name"], config, params, device, args.get("model_instance_name", config["name"]))

    @property
    def instances(self) -> int:
        """How many instances of this model Triton runs: count x GPUs of each instance group (Triton
        fills in every GPU of a KIND_GPU group that names none)."""
        total = 0
        for group in self.config.get("instance_group") or [{}]:
            gpus = group.get("gpus") or []
            on_gpus = str(group.get("kind", "")).upper() in ("KIND_GPU", "GPU")
            total += int(group.get("count", 1)) * (len(gpus) if on_gpus and gpus else 1)
        return total

    def instance_path(self, key: str) -> str:
        """A path parameter with "{device}" (cuda0, cpu) and "{instance}" filled in, so that every
        instance gets a file of its own: Triton gives the instances on each GPU one name."""
        return self.str(key).replace("{device}", self.device.replace(":", "")).replace("{instance}", self.instance_name)

    # typed parameter access; an empty string means "use the default"
    def str(self, key: str, default: str = "") -> str:
        value = self.params.get(key, "")
        return value if value.strip() else default

    def int(self, key: str, default: int) -> int:
        return self._number(key, default, int, "an integer")

    def float(self, key: str, default: float) -> float:
        return self._number(key, default, float, "a number")

    def _number(self, key: str, default, parse, what: str):
        value = self.str(key)
        if not value:
            return default
        try:
            return parse(value)
        except ValueError:
            raise ValueError(f"model {self.name}: parameter {key}={value!r} must be {what}") from None

    def bool(self, key: str, default: bool) -> bool:
        value = self.str(key).lower()
        if not value:
            return default
        if value in ("1", "true", "yes", "on"):
            return True
        if value in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"model {self.name}: parameter {key}={value!r} must be true or false")


def input_array(request, name: str):
    """A Triton request's input as numpy, or None when the (optional) input is absent. Only inside
    the Python backend's stub, where ``triton_python_backend_utils`` exists."""
    import triton_python_backend_utils as pb_utils

    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()


def input_torch(request, name: str):
    """A Triton request's input as a torch tensor over its memory (through DLPack, so bf16 too, which
    numpy lacks), or None when absent. Only inside the Python backend's stub."""
    import triton_python_backend_utils as pb_utils
    from torch.utils.dlpack import from_dlpack

    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else from_dlpack(tensor.to_dlpack())


def output_tensor(name: str, value):
    """A Triton output tensor from numpy, or from a torch tensor (through DLPack: bf16 too). Only
    inside the Python backend's stub."""
    import triton_python_backend_utils as pb_utils

    if isinstance(value, np.ndarray):
        return pb_utils.Tensor(name, value)
    from torch.utils.dlpack import to_dlpack

    return pb_utils.Tensor.from_dlpack(name, to_dlpack(value.contiguous()))


#: the Triton types a tensor of the models may have -> torch's (``tensor_dtype``)
TORCH_DTYPES = {"TYPE_FP32": "float32", "TYPE_BF16": "bfloat16"}


def tensor_dtype(config: dict, name: str):
    """The torch dtype of the input or output ``name`` in a model's config (``ModelArgs.config``)."""
    import torch

    for tensor in (config.get("input") or []) + (config.get("output") or []):
        if tensor.get("name") == name:
            kind = tensor.get("data_type")
            if kind not in TORCH_DTYPES:
                raise ValueError(f"model {config.get('name')}: {name} has data_type {kind}; expected one of "
                                 f"{', '.join(TORCH_DTYPES)}")
            return getattr(torch, TORCH_DTYPES[kind])
    raise ValueError(f"model {config.get('name')} has no tensor {name!r}")


def resolve_checkpoint(model_path: str, who: str) -> str:
    """``model_path`` as given, or the tiny demo checkpoint (with a loud warning) when empty."""
    if model_path.strip():
        return model_path.strip()
    from ..demo import DEMO_WARNING, demo_checkpoint

    banner = "!" * 100
    print(f"{banner}\n[{who}] WARNING: {DEMO_WARNING}\n{banner}", file=sys.stderr, flush=True)
    log.warning("%s: %s", who, DEMO_WARNING)
    return str(demo_checkpoint())


def load_model_parts(a: "ModelArgs", parts: set[str]):
    """(checkpoint path, the `parts` a Triton model needs), loaded on the model's device from its
    `model_path` / `base_qwen_path` parameters (the demo checkpoint when `model_path` is empty)."""
    from ..model.loading import load_parts

    path = resolve_checkpoint(a.str("model_path"), a.instance_name)
    if a.device.startswith("cuda"):  # this stub process serves one GPU: make it the current one
        import torch

        torch.cuda.set_device(a.device)
    return path, load_parts(path, base_qwen_path=a.str("base_qwen_path") or None, parts=parts, device=a.device)


def resolve_default_voice(value: str) -> tuple[Path, str]:
    """The default reference voice (audio file, transcript from the ``.txt`` beside it).

    A relative path is taken from the project root (where ``assets/`` lives)."""
    from ..demo import ASSETS

    path = Path(value or DEFAULT_VOICE).expanduser()
    if not path.is_absolute():
        path = ASSETS.parent / path
    text_path = path.with_suffix(".txt")
    if not path.is_file():
        raise FileNotFoundError(f"default_voice {path} does not exist")
    if not text_path.is_file():
        raise FileNotFoundError(f"default_voice {path} has no transcript {text_path}")
    transcript = text_path.read_text(encoding="utf-8").strip()
    if not transcript:
        raise ValueError(f"default voice transcript {text_path} is empty")
    return path, transcript


def thinker_backend(value: str) -> str:
    """Validate ``thinker_backend`` (auto | torch | sglang). Whether SGLang can really run is decided
    where the model loads (`chroma_triton.model.loading.make_thinker`), with a clear error."""
    value = (value or "auto").strip().lower()
    if value not in THINKER_BACKENDS:
        raise ValueError(f"thinker_backend must be one of {', '.join(THINKER_BACKENDS)}, got {value!r}")
    return value


def configure_logging() -> None:
    """Package logs to stderr (Triton's log) once per stub process."""
    root = logging.getLogger("chroma_triton")
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
        root.setLevel(os.environ.get("CHROMA_LOG_LEVEL", "INFO").upper())
