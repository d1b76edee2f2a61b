"""The interface the device server programs against: block storage behind one logical unit.

A backstore stores `size` bytes; offsets and lengths are in bytes, and the device server only
asks for whole logical blocks within the medium. It offers three kinds of calls:

- **Fast path, on the event loop** (never wait for media): `read_nowait` fills a buffer from a
  cache the backstore can read without blocking, or says it cannot; `mapped` lends a read-only
  view of a cached range (the lent-read path); `prefetch` is a hint; `allocated_bytes` is the
  latest figure known. A backstore without a cache answers False/None, and its `caps` say so.
- **Blocking calls** (`read_into`, `write`, `flush`, `deallocate`, `zero`, `extents`, the copy
  offers, `medium_size`, `resize`, `close`): run on the I/O threads (`threads.run_blocking`),
  several at a time; the device server's range locks order the ones that overlap. `write` of
  a small range may also run on the event loop, and only when `caps.write_inline` says the
  medium takes it into a cache (a page-cache write that rarely blocks; the device server stops
  doing so for a while when one did block). Every backstore has them, so a copy between any
  two backstores can run as one piece of blocking work.
- **Awaitable calls, on the event loop**: `aread`, `awrite`, `aflush`, `adeallocate`, `azero`,
  `aextents` run the blocking call on the I/O threads unless a backstore overrides them with
  its medium's own asynchronous I/O (librbd completions); `acompare_and_write` and
  `awrite_atomic` exist only where `caps` advertise them. A caller cancelled while waiting
  still waits for the I/O to end: the medium may be using its buffer until then.

Failures of the medium are OSError with an errno (ENOSPC and EDQUOT: out of space; anything
else: a medium error); a backstore turns its library's exceptions into OSError.

Snapshots (docs/snapshots.md) are named point-in-time copies of the whole medium that a backstore
keeps beside it: `snapshot_params` names the read-only medium of a snapshot (a backstore of the
same kind opens it), `create_snapshot` takes one (the device server has quiesced the logical
unit), `delete_snapshot`, `clone_snapshot` (a new writable medium from it) and
`rollback_snapshot` (the medium back to it). A kind without them raises OSError(EOPNOTSUPP).
Snapshot names are checked by the caller against `SNAPSHOT_NAME` before they reach a backstore.

Adding a kind of backstore is one module with a subclass and one entry in
`pytarget.backstore.KINDS`, the configuration key (`backstore: <kind>`) that names it. The
subclass is built from plain parameters (`open`, `provision`), never from configuration
objects. A kind whose library may be missing imports it inside `open`.
"""

from __future__ import annotations

import errno
import re
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from .threads import run_blocking

ReadHook = Callable[[memoryview], None]

# A snapshot's name: a file name, an RBD snapshot name and the tail of an NBD export name
# (`TARGET-IQN/LUN-ID@SNAPSHOT`) at once, so no slash, no `@`, no leading dot or dash.
SNAPSHOT_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+-]{0,62}$")


@dataclass
class Extent:
    """A run of bytes that is allocated (`mapped`) or deallocated (a hole)."""

    offset: int
    length: int
    mapped: bool


@dataclass
class Capabilities:
    """What a backstore offers beyond the required calls.

    Set when it opens; a fast path the medium turns out to refuse (a filesystem without
    reflinks or holes) may be withdrawn at run time, nothing is granted later. The device server
    picks its data path from these when a logical unit is built, and the VPD pages read them
    per command (SBC-3 6.6.3 Block Limits, 6.6.4 Logical Block Provisioning).
    """

    read_nowait: bool = False  # `read_nowait` can succeed: a cache read without blocking
    write_inline: bool = False  # a small `write` lands in a cache: it may run on the event loop
    lend: bool = False  # `mapped` can lend views of cached ranges
    thin: bool = False  # `deallocate` gives space back, `extents` report holes
    deallocated_reads_zero: bool = False  # LBPRZ: deallocated bytes read as zeros
    deallocate_granularity: int = 0  # bytes the medium deallocates as a unit (UNMAP GRANULARITY)
    deallocate_alignment: int = 0  # offset of the first whole unit (GRANULARITY ALIGNMENT)
    clone: bool = False  # `clone_from` may share blocks with a backstore of the same kind
    clone_alignment: int = 0  # bytes that clone offsets and lengths must be multiples of
    copy_range: bool = False  # `copy_range_from` may copy inside the storage
    copy_range_alignment: int = 0  # bytes that copy_range offsets and lengths must be multiples of
    compare_and_write_max: int = 0  # bytes `acompare_and_write` does atomically; 0: not offered
    compare_and_write_boundary: int = 0  # a range crossing a multiple of this is refused; 0: none
    atomic_write_unit_min: int = 0  # `awrite_atomic`: power-of-two lengths from min to max,
    atomic_write_unit_max: int = 0  # aligned to their length, all or nothing; 0: not offered


class Backstore(ABC):
    """Block storage behind one logical unit (see the module docstring for the rules)."""

    kind: ClassVar[str]  # the configuration key
    PARAMS: ClassVar[tuple[str, ...]] = ()  # parameters `open` and `provision` need
    OPTIONAL_PARAMS: ClassVar[tuple[str, ...]] = ()  # parameters they also accept

    size: int  # bytes the logical unit may address
    readonly: bool
    caps: Capabilities
    location: str  # where the data lives, for operators (a path, pool/image)

    # -- building
    @classmethod
    def check_params(cls, params: Mapping[str, object]) -> None:
        """ValueError naming the first missing or unknown parameter."""
        for name in cls.PARAMS:
            if name not in params:
                raise ValueError(f"backstore {cls.kind!r} needs {name!r}")
        for name in params:
            if name not in cls.PARAMS and name not in cls.OPTIONAL_PARAMS:
                raise ValueError(f"backstore {cls.kind!r} takes no {name!r}")

    @classmethod
    @abstractmethod
    def open(cls, params: Mapping[str, Any], *, readonly: bool = False) -> Backstore:
        """Open an existing medium; OSError when it is missing or unusable."""

    @classmethod
    @abstractmethod
    def exists(cls, params: Mapping[str, Any]) -> bool:
        """Whether the medium the parameters name exists."""

    @classmethod
    @abstractmethod
    def provision(cls, params: Mapping[str, Any], size: int) -> None:
        """Create a new, thinly provisioned medium of `size` bytes; FileExistsError rather than
        touching an existing one."""

    @property
    @abstractmethod
    def closed(self) -> bool: ...

    # -- fast path: on the event loop, never waits for media
    def read_nowait(self, buf: memoryview, offset: int) -> bool:
        """Fill `buf` from a cache without blocking; False (buf untouched or partly filled)
        when that would wait for the medium."""
        return False

    def mapped(self, offset: int, length: int) -> memoryview | None:
        """A read-only view of [offset, offset + length) as it is in a cache, or None when
        reading it would wait for the medium.

        The view shows the cache as it is when it is read: the caller keeps the range from
        changing (a range lock) until it is done, and never reads the view from Python (only a
        system call such as `sendmsg` does, which turns a page lost under it into EFAULT).
        Views stay valid after `close` until they are dropped.
        """
        return None

    def prefetch(self, offset: int, length: int) -> None:
        """Ask the medium to bring the range into its cache (PRE-FETCH); a hint."""
        return None

    def allocated_bytes(self) -> int:
        """Bytes of storage the medium uses, as last known."""
        return self.size

    # -- blocking: on the I/O threads (and `write` on the loop when caps.write_inline)
    @abstractmethod
    def read_into(self, buf: memoryview, offset: int) -> None:
        """Fill `buf` with the bytes at `offset` (zeros where nothing was ever written)."""

    @abstractmethod
    def write(self, data: memoryview, offset: int) -> None:
        """Write all of `data` at `offset`; durable after the next `flush`."""

    @abstractmethod
    def flush(self) -> None:
        """Make every completed write durable."""

    @abstractmethod
    def deallocate(self, offset: int, length: int) -> None:
        """Give the range's space back where the medium can (whole granules); afterwards it
        reads as zeros when `caps.deallocated_reads_zero`, else as anything until written."""

    @abstractmethod
    def zero(self, offset: int, length: int) -> None:
        """Zero the range and keep it allocated."""

    def extents(self, offset: int, length: int) -> list[Extent]:
        """Allocated and deallocated runs covering [offset, min(offset + length, size)), in
        order, adjacent runs of one kind merged."""
        end = min(offset + length, self.size)
        return [Extent(offset, end - offset, True)] if end > offset else []

    def clone_from(self, src: Backstore, src_offset: int, dst_offset: int, length: int) -> bool:
        """Make the range share `src`'s blocks (reflink); False, with nothing changed, when
        this medium cannot (another kind, another filesystem or pool). Offsets and length are
        multiples of `caps.clone_alignment`."""
        return False

    def copy_range_from(self, src: Backstore, src_offset: int, dst_offset: int,
                        length: int) -> bool:
        """Copy inside the storage, the data never passing through this process
        (copy_file_range, RADOS copy-from); False, with nothing changed, when it cannot.
        Offsets and length are multiples of `caps.copy_range_alignment` (when not 0)."""
        return False

    @abstractmethod
    def medium_size(self) -> int:
        """The size the medium has now (another process may have grown it); `size` is
        left alone."""

    @abstractmethod
    def resize(self, size: int) -> None:
        """Grow the medium to `size` bytes (or shrink it back after a grow) and set `size`."""

    @abstractmethod
    def close(self) -> None:
        """Release the medium; a second close does nothing."""

    def share_with_processes(self) -> None:
        """Other processes of this machine serve the medium too (`workers:`): from now on
        offer `acompare_and_write` and make `awrite_atomic` atomic against them as well. A
        medium whose atomic operations already hold across gateways does nothing."""
        return None

    # -- snapshots (blocking, on the I/O threads)
    @classmethod
    def snapshot_params(cls, params: Mapping[str, Any], name: str) -> dict[str, Any]:
        """The parameters that open snapshot `name` of the medium `params` names (read-only,
        with `open`), and whose `exists` says whether the snapshot exists."""
        raise OSError(errno.EOPNOTSUPP, f"backstore {cls.kind!r} keeps no snapshots")

    def create_snapshot(self, name: str) -> str:
        """Take snapshot `name` of the medium as it is now: every write completed before the
        call is in it, none issued after it (the caller holds writes back meanwhile).
        FileExistsError when it exists. Returns how it was made, for operators ("reflink",
        "copy", "rbd")."""
        raise OSError(errno.EOPNOTSUPP, f"{self.location}: this medium keeps no snapshots")

    def delete_snapshot(self, name: str) -> None:
        """Delete snapshot `name` and free what only it holds; FileNotFoundError when it does
        not exist, OSError(EBUSY) when a clone still depends on it."""
        raise OSError(errno.EOPNOTSUPP, f"{self.location}: this medium keeps no snapshots")

    def clone_snapshot(self, name: str, params: Mapping[str, Any]) -> None:
        """Create the writable medium `params` names (same kind) with the snapshot's
        contents, sharing its blocks where the storage can; FileExistsError rather than
        touching an existing medium."""
        raise OSError(errno.EOPNOTSUPP, f"{self.location}: this medium keeps no snapshots")

    def rollback_snapshot(self, name: str) -> None:
        """Make the medium's contents and size those of snapshot `name` (the caller keeps every
        reader and writer out meanwhile and sets `size` from `medium_size` afterwards)."""
        raise OSError(errno.EOPNOTSUPP, f"{self.location}: this medium keeps no snapshots")

    # -- awaitable: on the event loop
    def aread(self, buf: memoryview, offset: int, then: ReadHook | None = None
              ) -> Awaitable[None]:
        """`read_into` off the event loop, then `then(buf)` (a fabric's hook: iSCSI data
        digests) on the thread where the read completed, before the caller resumes."""
        return run_blocking(self._read_then, buf, offset, then)

    def _read_then(self, buf: memoryview, offset: int, then: ReadHook | None) -> None:
        self.read_into(buf, offset)
        if then is not None:
            then(buf)

    def awrite(self, data: memoryview, offset: int) -> Awaitable[None]:
        return run_blocking(self.write, data, offset)

    def aflush(self) -> Awaitable[None]:
        return run_blocking(self.flush)

    def adeallocate(self, offset: int, length: int) -> Awaitable[None]:
        return run_blocking(self.deallocate, offset, length)

    def azero(self, offset: int, length: int) -> Awaitable[None]:
        return run_blocking(self.zero, offset, length)

    def aextents(self, offset: int, length: int) -> Awaitable[list[Extent]]:
        return run_blocking(self.extents, offset, length)

    async def acompare_and_write(self, compare: memoryview, data: memoryview,
                                 offset: int) -> int | None:
        """Atomically against every writer of the medium (other processes and gateways too):
        when the bytes at `offset` equal `compare`, write `data` (as long) and return None;
        else write nothing and return the offset of the first byte that differs.

        Offered when `caps.compare_and_write_max` is not 0, for ranges up to that length that
        cross no multiple of `caps.compare_and_write_boundary`.
        """
        raise NotImplementedError(f"{type(self).__name__} has no atomic compare-and-write")

    async def awrite_atomic(self, data: memoryview, offset: int) -> None:
        """Write `data` all or nothing, also across a power loss.

        Offered when `caps.atomic_write_unit_max` is not 0, for power-of-two lengths from
        `atomic_write_unit_min` to `atomic_write_unit_max` at offsets aligned to the length.
        """
        raise NotImplementedError(f"{type(self).__name__} has no atomic write")
