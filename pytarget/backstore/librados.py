"""librados's C API through ctypes, loaded once per process and shared by everything that
reaches a Ceph cluster: the RBD backstore (`rbd.py`, which adds librbd over it, and
`rados_copy.py`) and the state gateways keep in RADOS (`cluster/rados.py`,
`cluster/ownership.py`). One table of prototypes, so a handle one of them opens is called
through the same declarations by the others (ownership runs on the RBD image's own client).
"""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Iterable, Mapping
from typing import Any

from .lazy import Lazy

DEFAULT_CONF = "/etc/ceph/ceph.conf"

CREATE_EXCLUSIVE = 1  # LIBRADOS_CREATE_EXCLUSIVE
CMPXATTR_EQ = 1  # LIBRADOS_CMPXATTR_OP_EQ

WatchCallback = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint64,
                                 ctypes.c_uint64, ctypes.c_void_p, ctypes.c_size_t)
WatchErrorCallback = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_int)

Prototype = tuple[str, Any, list[Any]]  # (C name, restype, argtypes)


def errno_error(ret: int, what: str) -> OSError:
    """The OSError of a Ceph call that returned -errno `ret`."""
    return OSError(-ret, f"{what}: {os.strerror(-ret)}")


def check(ret: int, what: str) -> int:
    """`ret` unless it is a negative errno, which is raised."""
    if ret < 0:
        raise errno_error(ret, what)
    return ret


def load(soname: str) -> ctypes.CDLL:
    """A Ceph client library; ENOENT naming the package when it is not installed."""
    try:
        return ctypes.CDLL(soname)
    except OSError as exc:
        library = soname.partition(".")[0]
        raise OSError(errno.ENOENT, f"{library} is not installed ({exc}); RBD LUNs and "
                      "shared reservations need Ceph's client libraries (ceph-common, see "
                      "tools/install-ceph)") from None


def declare(holder: object, lib: ctypes.CDLL, prototypes: Iterable[Prototype],
            symbols: Mapping[str, str] | None = None) -> None:
    """Set each prototype on its function of `lib` and the function on `holder` by name;
    `symbols` maps a name to the library's symbol where they differ (C++ mangled names)."""
    for name, restype, argtypes in prototypes:
        function = getattr(lib, (symbols or {}).get(name, name))
        function.restype = restype
        function.argtypes = argtypes
        setattr(holder, name, function)


def _prototypes() -> list[Prototype]:
    vp, u64, sz, i, cp = (ctypes.c_void_p, ctypes.c_uint64, ctypes.c_size_t, ctypes.c_int,
                          ctypes.c_char_p)
    return [
        ("rados_create", i, [ctypes.POINTER(vp), cp]),
        ("rados_conf_read_file", i, [vp, cp]),
        ("rados_conf_set", i, [vp, cp, cp]),
        ("rados_conf_get", i, [vp, cp, cp, sz]),
        ("rados_connect", i, [vp]),
        ("rados_shutdown", None, [vp]),
        ("rados_get_instance_id", u64, [vp]),
        ("rados_cluster_fsid", i, [vp, cp, sz]),
        ("rados_ioctx_create", i, [vp, cp, ctypes.POINTER(vp)]),
        ("rados_ioctx_create2", i, [vp, ctypes.c_int64, ctypes.POINTER(vp)]),
        ("rados_ioctx_destroy", None, [vp]),
        ("rados_read", i, [vp, cp, vp, sz, u64]),
        ("rados_remove", i, [vp, cp]),
        ("rados_create_write_op", vp, []),
        ("rados_release_write_op", None, [vp]),
        ("rados_write_op_create", None, [vp, i, cp]),
        ("rados_write_op_cmpxattr", None, [vp, cp, ctypes.c_uint8, cp, sz]),
        ("rados_write_op_setxattr", None, [vp, cp, cp, sz]),
        ("rados_write_op_write_full", None, [vp, cp, sz]),
        ("rados_write_op_operate", i, [vp, vp, cp, vp, i]),
        ("rados_watch3", i, [vp, cp, ctypes.POINTER(u64), WatchCallback, WatchErrorCallback,
                             ctypes.c_uint32, vp]),
        ("rados_watch_check", i, [vp, u64]),
        ("rados_unwatch2", i, [vp, u64]),
        ("rados_watch_flush", i, [vp]),
        ("rados_notify2", i, [vp, cp, cp, i, u64, ctypes.POINTER(vp), ctypes.POINTER(sz)]),
        ("rados_notify_ack", i, [vp, cp, u64, u64, cp, i]),
        ("rados_buffer_free", None, [vp]),
        ("rados_getaddrs", i, [vp, ctypes.POINTER(ctypes.c_void_p)]),
        ("rados_blocklist_add", i, [vp, cp, ctypes.c_uint32]),
        ("rados_wait_for_latest_osdmap", i, [vp]),
        ("rados_setxattr", i, [vp, cp, cp, cp, sz]),
        ("rados_getxattrs", i, [vp, cp, ctypes.POINTER(vp)]),
        ("rados_getxattrs_next", i, [vp, ctypes.POINTER(cp), ctypes.POINTER(vp),
                                     ctypes.POINTER(sz)]),
        ("rados_getxattrs_end", None, [vp]),
    ]


class Librados:
    """librados.so.2 with the prototypes of every caller (the process's one: `LIBRADOS`)."""

    def __init__(self) -> None:
        self.lib = load("librados.so.2")
        declare(self, self.lib, _prototypes())

    def __getattr__(self, name: str) -> Any:
        """The C functions set in __init__, by name (declared here for the type checker)."""
        raise AttributeError(name)


LIBRADOS = Lazy(Librados)


def connect(lib: Librados, pool: str, conf: str, client_id: str,
            settings: Mapping[str, str]) -> tuple[ctypes.c_void_p, ctypes.c_void_p]:
    """A cluster handle connected as client.`client_id` with `conf` and then `settings`
    (configuration keys and values), and an I/O context on `pool` (blocking)."""
    cluster = ctypes.c_void_p()
    check(lib.rados_create(ctypes.byref(cluster), client_id.encode()), "rados_create")
    ioctx = ctypes.c_void_p()
    try:
        check(lib.rados_conf_read_file(cluster, conf.encode()), f"reading {conf}")
        for key, value in settings.items():
            check(lib.rados_conf_set(cluster, key.encode(), value.encode()), f"setting {key}")
        check(lib.rados_connect(cluster), f"connecting to the cluster of {conf}")
        check(lib.rados_ioctx_create(cluster, pool.encode(), ctypes.byref(ioctx)),
              f"opening pool {pool}")
    except BaseException:
        lib.rados_shutdown(cluster)
        raise
    return cluster, ioctx
