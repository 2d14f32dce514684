"""CUDA MPS for the stack's own processes (launcher ``--cuda-mps``).

On a GPU, ``chroma_lm``, ``codec_decoder`` and ``audio_encoder`` are separate processes (Triton
Python stubs), each with its own CUDA context. Without MPS the GPU runs one context at a time, in
time slices, so a codec batch waits for a slice while the engine keeps the GPU busy: chunks queued
114-142 ms each in ``codec_decoder`` at 256 streams. Under MPS their kernels run side by side: 16-19
ms on the same machine, and fewer late chunks at the clients (docs/benchmarks.md, run 33).

The launcher starts a control daemon of its own: its pipe directory is private to this stack (the
processes find it through ``CUDA_MPS_PIPE_DIRECTORY``), so other CUDA programs on the machine are
not affected, and it is told to quit when the stack stops.

The daemon sees the GPUs of the launcher's ``CUDA_VISIBLE_DEVICES``, and a client's
``CUDA_VISIBLE_DEVICES`` counts within those: with ``CUDA_VISIBLE_DEVICES=1`` the daemon serves GPU 1
as its device 0, and a model process that asked for device 1 found no GPU at all (every model of
stacks on GPUs 1-3 of a 4-GPU machine failed to load). So the stack's processes get the daemon's
devices renumbered from 0.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

CONTROL = "nvidia-cuda-mps-control"
MODES = ("auto", "on", "off")


class MpsError(RuntimeError):
    pass


def find_control(mode: str, kind: str, which=shutil.which) -> str | None:
    """The control binary to use, or None for no MPS. ``auto``: on GPUs when the binary is there;
    ``on``: required (an error on the CPU or without the binary); ``off``: never."""
    if mode not in MODES:
        raise MpsError(f"--cuda-mps must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "off" or (mode == "auto" and kind != "gpu"):
        return None
    if kind != "gpu":
        raise MpsError("--cuda-mps on needs GPUs (this stack runs on the CPU)")
    binary = which(CONTROL)
    if binary is None and mode == "on":
        raise MpsError(f"--cuda-mps on: {CONTROL} is not on PATH (it comes with the NVIDIA driver utilities)")
    return binary


class MpsDaemon:
    """One MPS control daemon with a private pipe directory; ``env`` points processes at it."""

    def __init__(self, binary: str, log_dir: Path, visible: str | None = None):
        self.binary = binary
        self.visible = os.environ.get("CUDA_VISIBLE_DEVICES") if visible is None else visible
        # the pipe directory holds unix sockets, whose paths must stay short (about 100 bytes)
        self.pipe_dir = Path(tempfile.mkdtemp(prefix="chroma-mps-"))
        self.log_dir = Path(log_dir)
        self.running = False

    @property
    def _pipes(self) -> dict[str, str]:
        return {"CUDA_MPS_PIPE_DIRECTORY": str(self.pipe_dir), "CUDA_MPS_LOG_DIRECTORY": str(self.log_dir)}

    @property
    def _daemon_env(self) -> dict[str, str]:
        env = {**os.environ, **self._pipes}
        if self.visible is not None:
            env["CUDA_VISIBLE_DEVICES"] = self.visible
        return env

    @property
    def env(self) -> dict[str, str]:
        """What the stack's processes (the daemon's clients) need: its pipes, and the GPUs it sees
        numbered as it numbers them (0, 1, ... in the order of ``CUDA_VISIBLE_DEVICES``)."""
        env = self._pipes
        devices = [d for d in (self.visible or "").split(",") if d.strip()]
        if devices:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in range(len(devices)))
        return env

    def _control(self, args: list[str], stdin: str | None = None) -> subprocess.CompletedProcess:
        """A command to the running daemon (a client process that exits once answered)."""
        return subprocess.run([self.binary, *args], input=stdin, env=self._daemon_env,
                              capture_output=True, text=True, timeout=30)

    def start(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        # output to a file, not a pipe: the daemon it forks could hold a pipe open and keep us waiting
        out_path = self.log_dir / "control-start.txt"
        try:
            with open(out_path, "w") as out:
                done = subprocess.run([self.binary, "-d"], stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                      env=self._daemon_env, timeout=30)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise MpsError(f"{self.binary} -d failed: {exc}") from None
        if done.returncode != 0:
            said = out_path.read_text(errors="replace").strip()
            raise MpsError(f"{self.binary} -d exited with {done.returncode}: {said}")
        self.running = True
        log.info("CUDA MPS control daemon started (pipes %s, logs %s)", self.pipe_dir, self.log_dir)

    def stop(self) -> None:
        """Quit the daemon (after the stack's processes are gone) and remove its pipe directory."""
        if self.running:
            try:
                done = self._control([], stdin="quit\n")
                if done.returncode != 0:
                    log.warning("CUDA MPS quit exited with %s: %s", done.returncode, (done.stderr or done.stdout).strip())
            except (OSError, subprocess.TimeoutExpired) as exc:
                log.warning("CUDA MPS quit failed: %s", exc)
            self.running = False
        shutil.rmtree(self.pipe_dir, ignore_errors=True)
