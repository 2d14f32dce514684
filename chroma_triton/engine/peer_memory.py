"""Tensors another process of the same machine can map: the thinker prefix cache's pool, which
the engines of other GPUs read from (engine/peer_prefixes.py).

On a GPU the memory is exported with CUDA IPC (the driver's ``cuIpcGetMemHandle``) and opened in
the reader's own device context with peer access enabled (``cuIpcOpenMemHandle`` with
``CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS``): the reader gets a tensor *on its own device* whose memory
lies on the other GPU, so its copies out of it are kernels of its own context reading over
NVLink, and it opens no context on the other GPU. The tensor is made through DLPack, which takes
the device from the caller (``torch.as_tensor`` would ask the driver, which names the GPU that holds
the memory). On the CPU the memory is a file in ``/dev/shm``, mapped by both processes.

An export is a small JSON-able dict (:func:`export`); :func:`open_exported` maps it. The exporter
must keep its tensor alive as long as readers may use it (the pool lives as long as its engine).
"""

from __future__ import annotations

import ctypes
import math
import os
from pathlib import Path

import numpy as np
import torch

from ..shm_slots import create_file

_IPC_HANDLE_BYTES = 64
_LAZY_ENABLE_PEER_ACCESS = 1


class _IpcHandle(ctypes.Structure):  # CUipcMemHandle: cuIpcOpenMemHandle takes it by value
    _fields_ = [("reserved", ctypes.c_char * _IPC_HANDLE_BYTES)]


class PeerMemoryError(RuntimeError):
    pass


def shared_cpu_tensor(path: Path, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A zeroed CPU tensor backed by the file ``path`` (created; its space reserved now, so a full
    /dev/shm fails here), which another process maps with :func:`open_exported`."""
    count = math.prod(shape)
    create_file(path, max(count * dtype.itemsize, 1), np.zeros(0, np.uint8))
    return torch.from_file(str(path), shared=True, size=count, dtype=dtype).view(shape)


def export(t: torch.Tensor, path: Path | None = None) -> dict:
    """What another process needs to map the contiguous tensor ``t``: for a CUDA tensor its
    allocation's IPC handle and ``t``'s offset in it; for a CPU tensor made by
    :func:`shared_cpu_tensor`, that file (``path``)."""
    if not t.is_contiguous():
        raise PeerMemoryError("only a contiguous tensor can be exported")
    meta = {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
    if t.device.type == "cpu":
        if path is None:
            raise PeerMemoryError("a CPU tensor is exported by the file it was made on (shared_cpu_tensor)")
        return {**meta, "kind": "file", "path": str(path)}
    if t.device.type != "cuda":
        raise PeerMemoryError(f"cannot export memory of a {t.device.type} device")
    driver = _driver()
    with torch.cuda.device(t.device):
        base, size = ctypes.c_uint64(), ctypes.c_size_t()
        _check(driver.cuMemGetAddressRange_v2(ctypes.byref(base), ctypes.byref(size), ctypes.c_uint64(t.data_ptr())),
               "cuMemGetAddressRange")
        handle = _IpcHandle()
        _check(driver.cuIpcGetMemHandle(ctypes.byref(handle), base), "cuIpcGetMemHandle")
    return {**meta, "kind": "cuda", "handle": ctypes.string_at(ctypes.addressof(handle), _IPC_HANDLE_BYTES).hex(),
            "offset": t.data_ptr() - base.value, "device": t.device.index, "pid": os.getpid()}


def open_exported(record: dict, device: torch.device | str) -> torch.Tensor:
    """The tensor ``record`` (from :func:`export` in another process) describes, mapped into this
    process: on ``device`` (this process's GPU) for CUDA memory, on the CPU for a file."""
    shape = tuple(int(n) for n in record["shape"])
    dtype = getattr(torch, record["dtype"])
    if record["kind"] == "file":
        return torch.from_file(record["path"], shared=True, size=math.prod(shape), dtype=dtype).view(shape)
    if record["kind"] != "cuda":
        raise PeerMemoryError(f"unknown exported memory kind {record['kind']!r}")
    device = torch.device(device)
    if device.type != "cuda":
        raise PeerMemoryError("CUDA memory of another process can only be opened on a GPU")
    if record.get("pid") == os.getpid():
        raise PeerMemoryError("CUDA IPC cannot open a handle in the process that exported it")
    driver = _driver()
    with torch.cuda.device(device):
        torch.zeros(1, device=device)  # this thread's current context: the device's primary one
        handle = _IpcHandle.from_buffer_copy(bytes.fromhex(record["handle"]))
        base = ctypes.c_uint64()
        _check(driver.cuIpcOpenMemHandle_v2(ctypes.byref(base), handle, ctypes.c_uint(_LAZY_ENABLE_PEER_ACCESS)),
               "cuIpcOpenMemHandle")
    t, dlpack = _from_pointer(base.value + int(record["offset"]), shape, dtype, device)
    _opened[t.data_ptr()] = (base.value, device, dlpack)
    return t


def close_opened(t: torch.Tensor) -> None:
    """Unmap the CUDA memory of another process that `open_exported` mapped as `t` (nothing for
    a CPU file: its mapping goes with the tensor). The caller makes sure that no work reading it is
    queued any more and that `t` is not used again."""
    mapped = _opened.pop(t.data_ptr(), None)
    if mapped is None:
        return
    base, device, _dlpack = mapped
    with torch.cuda.device(device):
        _check(_driver().cuIpcCloseMemHandle(ctypes.c_uint64(base)), "cuIpcCloseMemHandle")


_driver_lib = None


def _driver():
    global _driver_lib
    if _driver_lib is None:
        try:
            lib = ctypes.CDLL("libcuda.so.1")
        except OSError as exc:
            raise PeerMemoryError(f"the CUDA driver library cannot be loaded: {exc}") from exc
        lib.cuMemGetAddressRange_v2.argtypes = [ctypes.POINTER(ctypes.c_uint64), ctypes.POINTER(ctypes.c_size_t),
                                                ctypes.c_uint64]
        lib.cuIpcGetMemHandle.argtypes = [ctypes.POINTER(_IpcHandle), ctypes.c_uint64]
        lib.cuIpcOpenMemHandle_v2.argtypes = [ctypes.POINTER(ctypes.c_uint64), _IpcHandle, ctypes.c_uint]
        lib.cuIpcCloseMemHandle.argtypes = [ctypes.c_uint64]
        _driver_lib = lib
    return _driver_lib


def _check(result: int, what: str) -> None:
    if result != 0:
        name = ctypes.c_char_p()
        text = "unknown error"
        if _driver_lib.cuGetErrorString(result, ctypes.byref(name)) == 0 and name.value:
            text = name.value.decode()
        raise PeerMemoryError(f"{what} failed: CUDA error {result} ({text})")


# DLPack, enough of it to hand torch a pointer on a device of our choosing
class _DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class _DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class _DLTensor(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("device", _DLDevice), ("ndim", ctypes.c_int32), ("dtype", _DLDataType),
                ("shape", ctypes.POINTER(ctypes.c_int64)), ("strides", ctypes.POINTER(ctypes.c_int64)),
                ("byte_offset", ctypes.c_uint64)]


class _DLManagedTensor(ctypes.Structure):
    _fields_ = [("dl_tensor", _DLTensor), ("manager_ctx", ctypes.c_void_p),
                ("deleter", ctypes.CFUNCTYPE(None, ctypes.c_void_p))]


_DL_CUDA = 2
_DL_CODES = {torch.float32: (2, 32), torch.float16: (2, 16), torch.bfloat16: (4, 16), torch.int64: (0, 64),
             torch.int32: (0, 32), torch.uint8: (1, 8)}
# a mapped tensor's pointer -> its allocation's mapped base, its device and its DLPack structures (kept
# alive while the memory is mapped: torch holds a pointer to them)
_opened: dict[int, tuple[int, torch.device, tuple]] = {}

_capsule_new = ctypes.pythonapi.PyCapsule_New
_capsule_new.restype = ctypes.py_object
_capsule_new.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]


def _from_pointer(pointer: int, shape: tuple[int, ...], dtype: torch.dtype,
                  device: torch.device) -> tuple[torch.Tensor, tuple]:
    """A tensor of `device` over `pointer`, and the DLPack structures it was made from."""
    if dtype not in _DL_CODES:
        raise PeerMemoryError(f"no DLPack code for {dtype}")
    code, bits = _DL_CODES[dtype]
    dims = (ctypes.c_int64 * len(shape))(*shape)
    managed = _DLManagedTensor()
    managed.dl_tensor = _DLTensor(ctypes.c_void_p(pointer), _DLDevice(_DL_CUDA, device.index or 0), len(shape),
                                  _DLDataType(code, bits, 1), dims, None, 0)
    managed.deleter = ctypes.CFUNCTYPE(None, ctypes.c_void_p)(0)
    capsule = _capsule_new(ctypes.addressof(managed), b"dltensor", None)
    return torch.utils.dlpack.from_dlpack(capsule), (managed, dims)
