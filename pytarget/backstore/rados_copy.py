"""RADOS copy-from: copy whole objects from OSD to OSD, the data never passing through this
process, through librados's C++ API.

librados 16.2 offers the COPY_FROM object operation only in C++
(`librados::ObjectWriteOperation::copy_from2`); its C API has no `rados_write_op_copy_from`.
This module reaches the C++ functions with ctypes by their mangled names, which pin the ABI they
use (symbol version LIBRADOS_14.2.0, libstdc++'s `std::__cxx11::basic_string`), over the C
handles the rest of the backstore already holds:

- `librados::IoCtx` is one pointer (`IoCtxImpl *`); `IoCtx::from_rados_ioctx_t` fills it from a
  C `rados_ioctx_t` and takes a reference, `~IoCtx` drops it;
- `librados::ObjectOperation` is a vtable pointer and an `ObjectOperationImpl *`, built and
  destroyed by its exported constructor and destructor (an ObjectWriteOperation adds one unused
  pointer, so 32 bytes hold either);
- `librados::AioCompletion` is one pointer to the C completion (`rados_completion_t`);
- `const std::string&` arguments are read only: a 32-byte libstdc++ string whose data pointer
  names a buffer kept alive by the caller.

A missing symbol (another librados) makes `available()` False and the backstore offers nothing.
"""

from __future__ import annotations

import ctypes
import errno
from collections.abc import Sequence
from typing import Any

from .lazy import Lazy
from .librados import LIBRADOS, declare

_NS = "_ZN8librados7v14_2_0"
_STRING = "RKNSt7__cxx1112basic_stringIcSt11char_traitsIcESaIcEEE"
_SYMBOLS = {
    "op_new": f"{_NS}15ObjectOperationC1Ev",
    "op_delete": f"{_NS}15ObjectOperationD1Ev",
    "copy_from2": f"{_NS}20ObjectWriteOperation10copy_from2E{_STRING}RKNS0_5IoCtxEmjmj",
    "aio_operate": f"{_NS}5IoCtx11aio_operateE{_STRING}PNS0_13AioCompletionE"
                   "PNS0_20ObjectWriteOperationEi",
    "ioctx_new": f"{_NS}5IoCtxC1Ev",
    "ioctx_delete": f"{_NS}5IoCtxD1Ev",
    "ioctx_from_c": f"{_NS}5IoCtx18from_rados_ioctx_tEPvRS1_",
}
_OBJECT_BYTES = 32  # room for an ObjectWriteOperation (24 bytes) and an IoCtx (8)

DEPTH = 16  # copy-from operations in flight per call


class _CxxString(ctypes.Structure):
    """libstdc++'s std::__cxx11::string, for a read-only argument."""

    _fields_ = [("data", ctypes.c_void_p), ("length", ctypes.c_size_t),
                ("capacity", ctypes.c_size_t), ("unused", ctypes.c_size_t)]


def _cxx_string(value: str) -> tuple[_CxxString, Any]:
    raw = ctypes.create_string_buffer(value.encode())
    return _CxxString(ctypes.addressof(raw), len(raw.value), len(raw.value), 0), raw


class _Cxx:
    def __init__(self, rados: ctypes.CDLL) -> None:
        vp, u32, u64, i = ctypes.c_void_p, ctypes.c_uint32, ctypes.c_uint64, ctypes.c_int
        declare(self, rados, [
            ("op_new", None, [vp]),
            ("op_delete", None, [vp]),
            ("copy_from2", None, [vp, vp, vp, u64, u32, u64, u32]),
            ("aio_operate", i, [vp, vp, vp, vp, i]),
            ("ioctx_new", None, [vp]),
            ("ioctx_delete", None, [vp]),
            ("ioctx_from_c", None, [vp, vp]),
            ("rados_aio_create_completion2", i, [vp, vp, ctypes.POINTER(vp)]),
            ("rados_aio_wait_for_complete", i, [vp]),
            ("rados_aio_get_return_value", i, [vp]),
            ("rados_aio_release", None, [vp]),
        ], _SYMBOLS)

    def __getattr__(self, name: str) -> Any:
        raise AttributeError(name)


def _load_cxx() -> _Cxx | None:
    try:
        return _Cxx(LIBRADOS.get().lib)
    except (OSError, AttributeError):
        return None


_CXX = Lazy(_load_cxx)


def available() -> bool:
    """Whether this librados exports the C++ copy-from this module calls."""
    return _CXX.get() is not None


class IoCtx:
    """A C++ `librados::IoCtx` over a C `rados_ioctx_t` (holding its own reference)."""

    def __init__(self, c_ioctx: ctypes.c_void_p) -> None:
        cxx = _CXX.get()
        if cxx is None:
            raise OSError(errno.EOPNOTSUPP, "librados has no C++ copy-from")
        self._cxx = cxx
        self.raw = ctypes.create_string_buffer(_OBJECT_BYTES)
        cxx.ioctx_new(self.raw)
        cxx.ioctx_from_c(c_ioctx, self.raw)
        self._open = True

    def close(self) -> None:
        if self._open:
            self._open = False
            self._cxx.ioctx_delete(self.raw)


def copy_objects(dst: IoCtx, src: IoCtx, pairs: Sequence[tuple[str, str]],
                 depth: int = DEPTH) -> list[int]:
    """Make each destination object a copy of its source object (data, xattrs, omap) with one
    COPY_FROM operation each, `depth` at a time; the return value of each (0, or -errno:
    -ENOENT when the source object does not exist). Blocking."""
    cxx = dst._cxx
    results = [0] * len(pairs)
    pending: list[tuple[int, ctypes.c_void_p, Any, Any]] = []

    def reap() -> None:
        index, completion, op, _keep = pending.pop(0)
        cxx.rados_aio_wait_for_complete(completion)
        results[index] = int(cxx.rados_aio_get_return_value(completion))
        cxx.rados_aio_release(completion)
        cxx.op_delete(op)

    try:
        for index, (src_oid, dst_oid) in enumerate(pairs):
            src_name, src_raw = _cxx_string(src_oid)
            dst_name, dst_raw = _cxx_string(dst_oid)
            op = ctypes.create_string_buffer(_OBJECT_BYTES)
            cxx.op_new(op)
            cxx.copy_from2(op, ctypes.byref(src_name), src.raw, 0, 0, 0, 0)
            completion = ctypes.c_void_p()
            ret = cxx.rados_aio_create_completion2(None, None, ctypes.byref(completion))
            if ret < 0:
                cxx.op_delete(op)
                results[index] = ret
                continue
            cell = ctypes.c_void_p(completion.value)  # a librados::AioCompletion
            ret = cxx.aio_operate(dst.raw, ctypes.byref(dst_name), ctypes.byref(cell), op, 0)
            if ret < 0:
                cxx.rados_aio_release(completion)
                cxx.op_delete(op)
                results[index] = ret
                continue
            pending.append((index, completion, op,
                            (src_name, src_raw, dst_name, dst_raw, cell)))
            if len(pending) >= depth:
                reap()
    finally:
        while pending:
            reap()
    return results
