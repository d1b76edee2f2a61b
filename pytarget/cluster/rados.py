"""A logical unit's shared reservation state in one RADOS object: `RadosReservationStore`
implements core/reservations.py's `ReservationStore` over librados's C API through ctypes.

The object's data is the version (8 bytes, big-endian) followed by the document; the xattr
`pytarget.version` holds the same version as decimal text. An update is one librados write
operation — compare the xattr with the version it was computed from
(`rados_write_op_cmpxattr`), write the whole object, set the xattr to the next version — which
the OSD applies atomically or not at all (-ECANCELED: another gateway changed it first, the
caller re-reads and recomputes). The object is created empty at version 0 by an exclusive
create, so two gateways starting together cannot both create it.

Changes are announced with watch/notify: every store watches the object (`rados_watch3`)
before it reads it, and after a successful update the author notifies (`rados_notify2`) and
returns only when every watcher has acknowledged. A watcher acknowledges after its handler
(the device server adopting the new state and queuing what it owes its I_T nexuses) has run
on the event loop. A notify that times out is repeated: it succeeds once the silent watcher
has acknowledged or the OSD has dropped its watch, which happens only after that watcher has
gone WATCH_TIMEOUT seconds without a confirmed ping — by which time `trusted` is false there
(TRUST_MS < WATCH_TIMEOUT), so it re-reads before acting. A copy older than MAX_AGE is not
trusted either, and an author gives up notifying only after NOTIFY_GIVE_UP > MAX_AGE, so even
a change whose notices were lost is seen everywhere before its command completes
(docs/scale-out-consistency.md).

librados calls back on its own threads; the callbacks only set flags and hand work to the event
loop. Connecting, reading, writing and notifying are blocking C calls run on worker threads
(ctypes releases the GIL around them), with librados's operation timeouts set so that a
gateway cut off from the cluster gets an error instead of waiting for ever.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import logging
import os
import threading
import time

from ..backstore.librados import (
    CMPXATTR_EQ,
    CREATE_EXCLUSIVE,
    DEFAULT_CONF,
    LIBRADOS,
    Librados,
    WatchCallback,
    WatchErrorCallback,
    check,
    connect,
)
from ..core.reservations import OnChange, Snapshot, StaleVersion

log = logging.getLogger("pytarget.cluster")

VERSION_XATTR = b"pytarget.version"
WATCH_TIMEOUT = 15  # seconds without a ping before the OSD drops a watch
TRUST_MS = 12_000  # a watch confirmed longer ago than this is not trusted
NOTIFY_TIMEOUT_MS = 5_000  # one round of notify
# A copy read longer ago than this is not trusted even with a healthy watch: a change whose
# notices never arrived (its author lost the cluster after writing) is seen within MAX_AGE.
MAX_AGE = 10.0  # seconds
# An author whose notify does not get every acknowledgement keeps trying this long before it
# completes; being longer than MAX_AGE, every gateway has re-read by then.
NOTIFY_GIVE_UP = 4 * WATCH_TIMEOUT  # seconds
NOTIFY_RETRY = 0.5  # seconds between attempts after a notify failed outright
OP_TIMEOUT = "10"  # seconds: librados's OSD and monitor operation timeouts
MAX_DOCUMENT = 64 << 20
_HEADER = 8

class RadosReservationStore:
    """One logical unit's reservation document in `pool`/`object_name`, for one gateway."""

    def __init__(self, pool: str, object_name: str, *, conf: str = DEFAULT_CONF,
                 keyring: str | None = None, client_id: str = "admin") -> None:
        self.pool = pool
        self.object_name = object_name
        self.conf = conf
        self.keyring = keyring
        self.client_id = client_id
        self._oid = object_name.encode()
        self._lib: Librados | None = None
        self._cluster = ctypes.c_void_p()
        self._ioctx = ctypes.c_void_p()
        self._instance_id = 0
        self._cookie: int | None = None
        # librados takes a watch cookie for the address of its state: rados_watch_check on an
        # unwatched cookie reads freed memory. The lock keeps checks and unwatches apart.
        self._cookie_lock = threading.Lock()
        self._dirty = True  # set from librados threads
        self._read_at = 0.0  # time.monotonic() before the last read or own write was sent
        self._watch_lost = False  # set from librados threads
        self._on_change: OnChange | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        self._connect_lock = asyncio.Lock()
        self._closed = False
        # Kept referenced for as long as librados may call them.
        self._watch_cb = WatchCallback(self._notified)
        self._watch_error_cb = WatchErrorCallback(self._watch_failed)

    @property
    def name(self) -> str:
        return f"rados:{self.pool}/{self.object_name}"

    # -------------------------------------------------------------- ReservationStore
    def subscribe(self, on_change: OnChange) -> None:
        self._on_change = on_change

    def trusted(self) -> bool:
        if self._dirty or self._watch_lost or time.monotonic() - self._read_at >= MAX_AGE:
            return False
        age = self._watch_age()
        return age is not None and 0 <= age < TRUST_MS

    async def load(self) -> Snapshot:
        self._loop = asyncio.get_running_loop()
        async with self._connect_lock:
            if self._lib is None:
                await asyncio.to_thread(self._connect)
            if not self._watching():
                await asyncio.to_thread(self._watch)
        self._dirty = False
        sent = time.monotonic()
        snapshot = await asyncio.to_thread(self._read)
        self._read_at = sent
        return snapshot

    async def update(self, version: int, document: bytes) -> int:
        if self._lib is None:
            raise OSError(errno.ENOTCONN, f"{self.name}: not loaded")
        sent = time.monotonic()
        await asyncio.to_thread(self._write, version, document)
        self._read_at = max(self._read_at, sent)
        await asyncio.to_thread(self._notify, version + 1)
        return version + 1

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for handler in self._handlers:
            handler.cancel()
        lib = self._lib
        if lib is None:
            return
        self._unwatch()
        lib.rados_watch_flush(self._cluster)
        with self._cookie_lock:
            self._lib = None
        lib.rados_ioctx_destroy(self._ioctx)
        lib.rados_shutdown(self._cluster)

    def _watching(self) -> bool:
        """Whether the watch is established and librados knows of no error on it."""
        if self._watch_lost:
            return False
        age = self._watch_age()
        return age is not None and age >= 0

    def _watch_age(self) -> int | None:
        """Milliseconds since the watch was last confirmed, a negative errno, or None when
        there is no watch."""
        with self._cookie_lock:
            lib, cookie = self._lib, self._cookie
            if lib is None or cookie is None:
                return None
            return int(lib.rados_watch_check(self._ioctx, cookie))

    def _unwatch(self) -> None:
        with self._cookie_lock:
            lib, cookie = self._lib, self._cookie
            self._cookie = None
            if lib is not None and cookie is not None:
                lib.rados_unwatch2(self._ioctx, cookie)

    # -------------------------------------------------------------- blocking parts
    def _connect(self) -> None:
        lib = LIBRADOS.get()
        settings = {"rados_osd_op_timeout": OP_TIMEOUT, "rados_mon_op_timeout": OP_TIMEOUT,
                    "client_mount_timeout": OP_TIMEOUT}
        if self.keyring is not None:
            settings["keyring"] = self.keyring
        self._cluster, self._ioctx = connect(lib, self.pool, self.conf, self.client_id, settings)
        self._instance_id = int(lib.rados_get_instance_id(self._cluster))
        self._lib = lib

    def _watch(self) -> None:
        lib = self._lib
        assert lib is not None
        self._unwatch()
        self._create()
        self._watch_lost = False
        cookie = ctypes.c_uint64()
        check(lib.rados_watch3(self._ioctx, self._oid, ctypes.byref(cookie), self._watch_cb,
                               self._watch_error_cb, WATCH_TIMEOUT, None),
              f"watching {self.name}")
        self._cookie = int(cookie.value)

    def _create(self) -> None:
        """The object at version 0 with no document, unless it exists."""
        lib = self._lib
        assert lib is not None
        op = lib.rados_create_write_op()
        try:
            lib.rados_write_op_create(op, CREATE_EXCLUSIVE, None)
            lib.rados_write_op_setxattr(op, VERSION_XATTR, b"0", 1)
            ret = lib.rados_write_op_operate(op, self._ioctx, self._oid, None, 0)
        finally:
            lib.rados_release_write_op(op)
        if ret != -errno.EEXIST:
            check(ret, f"creating {self.name}")

    def _read(self) -> Snapshot:
        lib = self._lib
        assert lib is not None
        size = 64 << 10
        while True:
            buf = ctypes.create_string_buffer(size)
            ret = lib.rados_read(self._ioctx, self._oid, buf, size, 0)
            if ret == -errno.ENOENT:
                return Snapshot(0, None)
            check(ret, f"reading {self.name}")
            if ret < size or size >= MAX_DOCUMENT:
                break
            size *= 4
        data = buf.raw[:ret]
        if len(data) < _HEADER:
            return Snapshot(0, None)
        return Snapshot(int.from_bytes(data[:_HEADER], "big"), data[_HEADER:])

    def _write(self, version: int, document: bytes) -> None:
        lib = self._lib
        assert lib is not None
        expected = str(version).encode()
        following = str(version + 1).encode()
        data = (version + 1).to_bytes(_HEADER, "big") + document
        op = lib.rados_create_write_op()
        try:
            lib.rados_write_op_cmpxattr(op, VERSION_XATTR, CMPXATTR_EQ, expected,
                                        len(expected))
            lib.rados_write_op_write_full(op, data, len(data))
            lib.rados_write_op_setxattr(op, VERSION_XATTR, following, len(following))
            ret = lib.rados_write_op_operate(op, self._ioctx, self._oid, None, 0)
        finally:
            lib.rados_release_write_op(op)
        if ret in (-errno.ECANCELED, -errno.ENOENT, -errno.ENODATA):
            raise StaleVersion(f"{self.name} is no longer at version {version}")
        check(ret, f"updating {self.name}")

    def _notify(self, version: int) -> None:
        """Tell every watcher; return once all have acknowledged or been dropped."""
        lib = self._lib
        assert lib is not None
        payload = str(version).encode()
        deadline = time.monotonic() + NOTIFY_GIVE_UP
        while True:
            reply = ctypes.c_void_p()
            reply_length = ctypes.c_size_t()
            ret = lib.rados_notify2(self._ioctx, self._oid, payload, len(payload),
                                    NOTIFY_TIMEOUT_MS, ctypes.byref(reply),
                                    ctypes.byref(reply_length))
            if reply.value:
                lib.rados_buffer_free(reply)
            if ret >= 0:
                return
            if time.monotonic() > deadline:
                log.error("%s: version %d written but not acknowledged by every gateway: %s; "
                          "the others have re-read it by now (they re-read every %g s)",
                          self.name, version, os.strerror(-ret), MAX_AGE)
                return
            log.warning("%s: version %d not acknowledged by every gateway yet (%s); notifying "
                        "again until they do or their watches expire", self.name, version,
                        os.strerror(-ret))
            if ret != -errno.ETIMEDOUT:
                time.sleep(NOTIFY_RETRY)

    # -------------------------------------------------------------- librados threads
    def _notified(self, arg: int | None, notify_id: int, cookie: int, notifier_id: int,
                  data: int | None, length: int) -> None:
        lib = self._lib
        if lib is None:
            return
        if notifier_id == self._instance_id:
            lib.rados_notify_ack(self._ioctx, self._oid, notify_id, cookie, None, 0)
            return
        self._dirty = True
        loop = self._loop
        if loop is None:
            lib.rados_notify_ack(self._ioctx, self._oid, notify_id, cookie, None, 0)
            return
        try:
            loop.call_soon_threadsafe(self._start_handler, notify_id, cookie)
        except RuntimeError:
            pass  # the loop is closed: the gateway is going away; its watch goes with it

    def _watch_failed(self, arg: int | None, cookie: int, err: int) -> None:
        self._watch_lost = True
        log.warning("%s: watch lost (%s); commands re-read the state until it is back",
                    self.name, os.strerror(-err) if err < 0 else err)

    # -------------------------------------------------------------- event loop
    def _start_handler(self, notify_id: int, cookie: int) -> None:
        handler = asyncio.get_running_loop().create_task(self._handle(notify_id, cookie))
        self._handlers.add(handler)
        handler.add_done_callback(self._handlers.discard)

    async def _handle(self, notify_id: int, cookie: int) -> None:
        try:
            if self._on_change is not None:
                await self._on_change()
        except Exception:
            log.exception("%s: adopting a change failed; commands re-read before they act",
                          self.name)
        finally:
            lib = self._lib
            if lib is not None and not self._closed:
                await asyncio.to_thread(lib.rados_notify_ack, self._ioctx, self._oid,
                                        notify_id, cookie, None, 0)


async def remove_state(pool: str, object_name: str, *, conf: str = DEFAULT_CONF,
                       keyring: str | None = None, client_id: str = "admin") -> None:
    """Delete a logical unit's shared reservation state (an operator's reset of it)."""
    store = RadosReservationStore(pool, object_name, conf=conf, keyring=keyring,
                                  client_id=client_id)

    def remove() -> None:
        store._connect()
        lib = store._lib
        assert lib is not None
        ret = lib.rados_remove(store._ioctx, store._oid)
        if ret != -errno.ENOENT:
            check(ret, f"removing {store.name}")

    try:
        await asyncio.to_thread(remove)
    finally:
        store.close()
