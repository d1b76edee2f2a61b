"""The file backstore: a logical unit's blocks in a regular (usually sparse) file or a block
device (`backstore: file`).

Reads and writes are `os.preadv`/`os.pwritev` into and out of the caller's buffers: a read
first tries the page cache with RWF_NOWAIT on the event loop, and small writes go to the page
cache from the loop; `mapped` lends a read-only view of a range that is in the page cache.
Durability is `fdatasync`; space is given back with `fallocate(PUNCH_HOLE|KEEP_SIZE)`;
allocation is found with SEEK_DATA/SEEK_HOLE; copies between files use FICLONERANGE or
`copy_file_range` where the filesystem offers them. The awaitable calls are the blocking ones
on the I/O threads (`Backstore`'s defaults). No atomic compare-and-write.

Atomic writes (`awrite_atomic`, WRITE ATOMIC(16)) are offered where the kernel and the filesystem
guarantee them across a power loss: Linux 6.11 and later, `pwritev(RWF_ATOMIC)` on a second
descriptor opened with O_DIRECT, for power-of-two lengths within the unit range
`statx(STATX_WRITE_ATOMIC)` reports, at offsets aligned to the length (XFS: 4 KiB to 1 MiB with
reflink=1; ext4 with bigalloc: its cluster; elsewhere nothing, and nothing is advertised). The
normal descriptor and its page-cache path are untouched; the kernel writes back and drops the
cached pages of a range before a direct write to it.

Snapshots are files in a directory beside the backing file, `<file>.snapshots/<name>`. Where the
filesystem shares blocks (XFS with reflink=1, Btrfs) a snapshot is one FICLONE of the whole
file: instant, atomic against concurrent writes, and sharing every block until either side
writes it. Elsewhere it is a full sparse copy: SEEK_DATA/SEEK_HOLE find the data, which is
copied with `copy_file_range`, and holes stay holes, so the cost is the allocated bytes, not the
LUN's size (docs/snapshots.md has the figures and why not copy-on-write).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import mmap
import os
import stat
import struct
from collections.abc import Mapping
from typing import Any

import numpy as np

from .base import Backstore, Capabilities, Extent
from .threads import run_blocking

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
FICLONERANGE = 0x4020940D
FICLONE = 0x40049409
SNAPSHOT_DIR_SUFFIX = ".snapshots"
# FICLONE refusals that mean "this filesystem (or pair of files) cannot share blocks".
_NO_REFLINK = (errno.EOPNOTSUPP, errno.ENOTTY, errno.EXDEV, errno.EINVAL, errno.ENOSYS,
               errno.EPERM)

# Byte-range locks of the open file description (F_OFD_SETLKW), exclusive between the worker
# processes that each opened the file; `struct flock` on Linux: type, whence, start, len, pid.
F_OFD_SETLKW = 38
_FLOCK = struct.Struct("hhqqi4x")
# COMPARE AND WRITE under such a lock: what the device server may ask for at most.
SHARED_COMPARE_AND_WRITE_MAX = 1 << 20

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_fallocate = _libc.fallocate
_fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
_fallocate.restype = ctypes.c_int

# mincore never blocks: called with the GIL held (PyDLL), it costs less than a GIL hand-off.
_libc_gil = ctypes.PyDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_mincore = _libc_gil.mincore
_mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p)
_mincore.restype = ctypes.c_int

_statx = _libc.statx if hasattr(_libc, "statx") else None
AT_EMPTY_PATH = 0x1000
STATX_WRITE_ATOMIC = 0x00010000
STATX_DIOALIGN = 0x00002000
STATX_ATTR_WRITE_ATOMIC = 0x00400000
_STATX_SIZE = 256
_STATX_ATTRIBUTES = struct.Struct("<Q")  # stx_attributes, at 8
_STATX_MASK = struct.Struct("<I")  # stx_mask, at 0
_STATX_DIO = struct.Struct("<II")  # stx_dio_mem_align, stx_dio_offset_align, at 0x98
_STATX_ATOMIC = struct.Struct("<II")  # stx_atomic_write_unit_min, _max, at 0xA8
RWF_ATOMIC = 0x00000040

_ZEROS = bytes(1 << 20)
_PAGE = mmap.PAGESIZE

# Holes are punched in filesystem blocks, 4 KiB on the filesystems pytarget runs on; partial ones
# are zeroed by the filesystem. Reflinks share whole filesystem blocks.
DEALLOCATE_GRANULARITY = 4096
CLONE_ALIGNMENT = 4096

# `mapped` maps the file in windows of 128 MiB on demand and keeps at most 32 of them per file:
# 4 GiB of address space and, fully touched, 8 MiB of page tables. A window dropped from the
# cache is unmapped once the last view lent from it is gone.
MAP_WINDOW_SHIFT = 27
MAP_WINDOW = 1 << MAP_WINDOW_SHIFT
MAP_WINDOWS = 32


def atomic_write_units(fd: int) -> tuple[int, int, int]:
    """(unit min, unit max, memory alignment) of RWF_ATOMIC direct writes to the open file, from
    statx(STATX_WRITE_ATOMIC); (0, 0, 0) when the kernel or the filesystem offers none."""
    if _statx is None:
        return 0, 0, 0
    buf = ctypes.create_string_buffer(_STATX_SIZE)
    if _statx(fd, b"", AT_EMPTY_PATH, STATX_WRITE_ATOMIC | STATX_DIOALIGN, buf) != 0:
        return 0, 0, 0
    raw = buf.raw
    mask, = _STATX_MASK.unpack_from(raw, 0)
    attributes, = _STATX_ATTRIBUTES.unpack_from(raw, 8)
    if not mask & STATX_WRITE_ATOMIC or not attributes & STATX_ATTR_WRITE_ATOMIC:
        return 0, 0, 0
    unit_min, unit_max = _STATX_ATOMIC.unpack_from(raw, 0xA8)
    mem_align = _STATX_DIO.unpack_from(raw, 0x98)[0] if mask & STATX_DIOALIGN else _PAGE
    if not unit_min or unit_max < unit_min:
        return 0, 0, 0
    return unit_min, unit_max, max(mem_align, 1)


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class FileBackstore(Backstore):
    """Block storage in a file; offsets and lengths are in bytes."""

    kind = "file"
    PARAMS = ("path",)

    def __init__(self, path: str, readonly: bool = False) -> None:
        self.path = path
        self.readonly = readonly
        flags = os.O_RDONLY if readonly else os.O_RDWR
        self.fd = os.open(path, flags | os.O_CLOEXEC)
        st = os.fstat(self.fd)
        if not stat.S_ISREG(st.st_mode) and not stat.S_ISBLK(st.st_mode):
            os.close(self.fd)
            raise OSError(errno.EINVAL, f"{path} is not a regular file or block device")
        self.location = path
        self.size = st.st_size if stat.S_ISREG(st.st_mode) else self._block_device_size()
        self.can_punch = True
        self.can_zero_range = True
        self.caps = Capabilities(
            read_nowait=True, write_inline=True,
            lend=stat.S_ISREG(st.st_mode),  # a block device is read with preadv
            thin=True, deallocated_reads_zero=True,
            deallocate_granularity=DEALLOCATE_GRANULARITY, deallocate_alignment=0,
            clone=True, clone_alignment=CLONE_ALIGNMENT, copy_range=True)
        self._can_map = self.caps.lend  # mirrors caps.lend: one attribute less per lent read
        self._windows: dict[int, tuple[memoryview, int]] = {}  # index -> (view, address)
        self._residency = bytearray(0)  # mincore's answer, one byte per page
        self._residency_c: ctypes.Array[ctypes.c_char] | None = None  # pins its address
        self._residency_at = 0
        self._direct_fd = -1  # O_DIRECT descriptor for atomic writes
        self._shared = False  # other processes write the file (share_with_processes)
        if not readonly:
            self._open_atomic()

    def _open_atomic(self) -> None:
        """Offer atomic writes when the file takes RWF_ATOMIC direct writes."""
        unit_min, unit_max, _align = atomic_write_units(self.fd)
        if not unit_max:
            return
        try:
            self._direct_fd = os.open(self.path, os.O_RDWR | os.O_DIRECT | os.O_CLOEXEC)
        except OSError:
            return
        self.caps.atomic_write_unit_min = unit_min
        self.caps.atomic_write_unit_max = unit_max

    def _block_device_size(self) -> int:
        return os.lseek(self.fd, 0, os.SEEK_END)

    @classmethod
    def open(cls, params: Mapping[str, Any], *, readonly: bool = False) -> FileBackstore:
        return cls(str(params["path"]), readonly=readonly)

    @classmethod
    def exists(cls, params: Mapping[str, Any]) -> bool:
        return os.path.exists(str(params["path"]))

    @classmethod
    def provision(cls, params: Mapping[str, Any], size: int) -> None:
        path = str(params["path"])
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        cls.create(path, size)

    @staticmethod
    def create(path: str, size: int) -> None:
        """Create a sparse file of `size` bytes; never touches an existing file."""
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, size)
            os.fsync(fd)
        finally:
            os.close(fd)
        dfd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    @property
    def closed(self) -> bool:
        return self.fd < 0

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self._direct_fd >= 0:
            os.close(self._direct_fd)
            self._direct_fd = -1
        self._windows.clear()  # views still lent out keep their window mapped until they go

    # -- data
    def read_nowait(self, buf: memoryview, offset: int) -> bool:
        """Fill buf from the page cache without blocking; False when that would block."""
        try:
            n = os.preadv(self.fd, (buf,), offset, os.RWF_NOWAIT)
        except BlockingIOError:
            return False
        except OSError as exc:
            if exc.errno in (errno.EOPNOTSUPP, errno.EAGAIN):
                return False
            raise
        if n == len(buf):
            return True
        if n == 0 or offset + n >= self.size:
            buf[n:] = _zeros(len(buf) - n)
            return True
        self.read_into(buf[n:], offset + n)
        return True

    def mapped(self, offset: int, length: int) -> memoryview | None:
        """A read-only view of [offset, offset + length) through a shared mapping of the file,
        or None when part of it is not in the page cache (touching it would wait for the
        disk), the range crosses a mapping window, or the file cannot be mapped.

        The view shows the page cache as it is when it is read, so the caller must keep the
        range from changing (a range lock) until it is done with it. Python code must not
        read it: if the file is truncated by someone else meanwhile, a read of the lost pages
        from Python is a SIGBUS, while the kernel (`sendmsg`) gets EFAULT, an ordinary error.
        """
        index = offset >> MAP_WINDOW_SHIFT
        start = offset - (index << MAP_WINDOW_SHIFT)
        end = start + length
        if end > MAP_WINDOW or not self._can_map:
            return None
        window = self._windows.get(index)
        if window is None or end > len(window[0]):
            window = self._map(index, end)
            if window is None:
                return None
        view, address = window
        first = (address + start) & -_PAGE
        pages = (address + end - first + _PAGE - 1) // _PAGE
        if pages > len(self._residency):
            self._residency = bytearray(max(pages, 64))
            self._residency_c = (ctypes.c_char * len(self._residency)).from_buffer(self._residency)
            self._residency_at = ctypes.addressof(self._residency_c)
        if _mincore(first, pages * _PAGE, self._residency_at) != 0:
            return None
        if self._residency.find(0, 0, pages) >= 0:  # bit 0 of each byte: page resident
            return None
        return view[start:end]

    def _map(self, index: int, need: int) -> tuple[memoryview, int] | None:
        base = index << MAP_WINDOW_SHIFT
        length = min(MAP_WINDOW, self.size - base)
        if length < need:
            return None
        try:
            region = mmap.mmap(self.fd, length, mmap.MAP_SHARED, mmap.PROT_READ, offset=base)
        except (OSError, ValueError):
            self._can_map = self.caps.lend = False
            return None
        if index not in self._windows and len(self._windows) >= MAP_WINDOWS:
            del self._windows[next(iter(self._windows))]  # the oldest
        address = np.frombuffer(region, dtype=np.uint8).ctypes.data
        window = self._windows[index] = (memoryview(region), address)
        return window

    def read_into(self, buf: memoryview, offset: int) -> None:
        """Fill buf with the bytes at offset (zeros past the end of the file)."""
        total = len(buf)
        done = 0
        while done < total:
            n = os.preadv(self.fd, (buf[done:],), offset + done)
            if n == 0:
                buf[done:] = _zeros(total - done)
                return
            done += n

    def write(self, data: memoryview, offset: int) -> None:
        total = len(data)
        done = 0
        while done < total:
            done += os.pwritev(self.fd, (data[done:],), offset + done)

    def flush(self) -> None:
        os.fdatasync(self.fd)

    async def awrite_atomic(self, data: memoryview, offset: int) -> None:
        """All of `data` or none of it, across a power loss: one RWF_ATOMIC direct write from a
        page-aligned copy (O_DIRECT wants aligned memory). Durable after the next `flush`."""
        if self._direct_fd < 0:
            raise NotImplementedError(f"{self.path} takes no atomic writes")
        n = len(data)
        caps = self.caps
        if n & (n - 1) or offset % n \
                or not caps.atomic_write_unit_min <= n <= caps.atomic_write_unit_max:
            raise OSError(errno.EINVAL, "not an atomic write unit of this file")
        await run_blocking(self._write_atomic, data, offset)

    def share_with_processes(self) -> None:
        """Atomic operations also exclude the other processes' atomic operations on the same
        bytes, by an OFD byte-range lock around them (writes that need no atomicity take no
        lock: the range locks order them within each process)."""
        self._shared = True
        if not self.readonly:
            self.caps.compare_and_write_max = SHARED_COMPARE_AND_WRITE_MAX

    def _range_lock(self, kind: int, offset: int, length: int) -> None:
        fcntl.fcntl(self.fd, F_OFD_SETLKW, _FLOCK.pack(kind, os.SEEK_SET, offset, length, 0))

    async def acompare_and_write(self, compare: memoryview, data: memoryview,
                                 offset: int) -> int | None:
        if not self._shared:
            raise NotImplementedError(f"{self.path}: compare-and-write is the device server's")
        return await run_blocking(self._compare_and_write, compare, data, offset)

    def _compare_and_write(self, compare: memoryview, data: memoryview,
                           offset: int) -> int | None:
        n = len(compare)
        self._range_lock(fcntl.F_WRLCK, offset, n)
        try:
            current = bytearray(n)
            self.read_into(memoryview(current), offset)
            diff = np.flatnonzero(np.frombuffer(current, dtype=np.uint8)
                                  != np.frombuffer(compare, dtype=np.uint8))
            if diff.size:
                return int(diff[0])
            self.write(data, offset)
            return None
        finally:
            self._range_lock(fcntl.F_UNLCK, offset, n)

    def _write_atomic(self, data: memoryview, offset: int) -> None:
        if self._shared:
            self._range_lock(fcntl.F_WRLCK, offset, len(data))
            try:
                self._write_atomic_unlocked(data, offset)
            finally:
                self._range_lock(fcntl.F_UNLCK, offset, len(data))
        else:
            self._write_atomic_unlocked(data, offset)

    def _write_atomic_unlocked(self, data: memoryview, offset: int) -> None:
        with mmap.mmap(-1, len(data)) as aligned:
            aligned[:] = data
            view = memoryview(aligned)
            try:
                written = os.pwritev(self._direct_fd, (view,), offset, RWF_ATOMIC)
            finally:
                view.release()
        if written != len(data):
            raise OSError(errno.EIO, f"atomic write of {len(data)} bytes wrote {written}")

    def prefetch(self, offset: int, length: int) -> None:
        os.posix_fadvise(self.fd, offset, length, os.POSIX_FADV_WILLNEED)

    # -- provisioning
    def deallocate(self, offset: int, length: int) -> None:
        """Deallocate a range; it reads back as zeros."""
        if self.can_punch:
            try:
                fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
                return
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                    raise
                self.can_punch = False
        self._write_zeros(offset, length)

    def zero(self, offset: int, length: int) -> None:
        """Zero a range and keep it allocated."""
        if self.can_zero_range:
            try:
                fallocate(self.fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, length)
                return
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                    raise
                self.can_zero_range = False
        self._write_zeros(offset, length)

    def _write_zeros(self, offset: int, length: int) -> None:
        end = offset + length
        while offset < end:
            n = min(len(_ZEROS), end - offset)
            self.write(memoryview(_ZEROS)[:n], offset)
            offset += n

    def extents(self, offset: int, length: int) -> list[Extent]:
        """Mapped/unmapped runs covering [offset, offset+length) from SEEK_DATA/SEEK_HOLE."""
        end = min(offset + length, self.size)
        out: list[Extent] = []
        pos = offset
        while pos < end:
            try:
                data = os.lseek(self.fd, pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:
                    data = end
                else:
                    raise
            data = min(data, end)
            if data > pos:
                out.append(Extent(pos, data - pos, False))
                pos = data
                if pos >= end:
                    break
            hole = min(os.lseek(self.fd, pos, os.SEEK_HOLE), end)
            out.append(Extent(pos, hole - pos, True))
            pos = hole
        return out

    def allocated_bytes(self) -> int:
        return os.fstat(self.fd).st_blocks * 512

    # -- size
    def medium_size(self) -> int:
        st = os.fstat(self.fd)
        if stat.S_ISREG(st.st_mode):
            return st.st_size
        return self._block_device_size()

    def resize(self, size: int) -> None:
        """ftruncate: only a regular file can change its size."""
        os.ftruncate(self.fd, size)
        self.size = size

    # -- snapshots
    @classmethod
    def snapshot_params(cls, params: Mapping[str, Any], name: str) -> dict[str, Any]:
        path = str(params["path"])
        return {"path": os.path.join(path + SNAPSHOT_DIR_SUFFIX, name)}

    def _snapshot_path(self, name: str) -> str:
        return str(self.snapshot_params({"path": self.path}, name)["path"])

    def _regular(self) -> None:
        if not stat.S_ISREG(os.fstat(self.fd).st_mode):
            raise OSError(errno.EOPNOTSUPP, f"{self.path} is a block device: snapshot it with "
                          "the volume manager below it")

    def create_snapshot(self, name: str) -> str:
        """FICLONE the whole file into `<file>.snapshots/<name>`, or copy its data sparsely
        where the filesystem cannot share blocks."""
        self._regular()
        path = self._snapshot_path(name)
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        return _new_file_from(self.fd, path, self.size)

    def delete_snapshot(self, name: str) -> None:
        path = self._snapshot_path(name)
        os.unlink(path)
        _fsync_directory(os.path.dirname(path))
        try:
            os.rmdir(os.path.dirname(path))
        except OSError:
            pass  # other snapshots remain

    def clone_snapshot(self, name: str, params: Mapping[str, Any]) -> None:
        path = str(params["path"])
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        src = os.open(self._snapshot_path(name), os.O_RDONLY | os.O_CLOEXEC)
        try:
            _new_file_from(src, path, os.fstat(src).st_size)
        finally:
            os.close(src)

    def rollback_snapshot(self, name: str) -> None:
        """Empty the file and clone (or sparsely copy) the snapshot into it. Not atomic across
        a crash: an interrupted rollback is run again (docs/snapshots.md)."""
        self._regular()
        src = os.open(self._snapshot_path(name), os.O_RDONLY | os.O_CLOEXEC)
        try:
            size = os.fstat(src).st_size
            self._windows.clear()  # views lent from them stay valid until dropped
            os.ftruncate(self.fd, 0)
            _clone_or_copy(src, self.fd, size)
            os.fsync(self.fd)
        finally:
            os.close(src)

    # -- copy offload between files
    def clone_from(self, src: Backstore, src_offset: int, dst_offset: int, length: int) -> bool:
        """Share src's blocks (FICLONERANGE); False when the filesystem cannot."""
        if not self.caps.clone or not isinstance(src, FileBackstore):
            return False
        arg = struct.pack("qQQQ", src.fd, src_offset, length, dst_offset)
        try:
            fcntl.ioctl(self.fd, FICLONERANGE, arg)
            return True
        except OSError as exc:
            if exc.errno in (errno.EOPNOTSUPP, errno.ENOTTY, errno.EXDEV, errno.EINVAL,
                             errno.ENOSYS, errno.EPERM):
                if exc.errno != errno.EINVAL:
                    self.caps.clone = False
                return False
            raise

    def copy_range_from(self, src: Backstore, src_offset: int, dst_offset: int,
                        length: int) -> bool:
        """Copy in the kernel (copy_file_range); False when unsupported here."""
        if not self.caps.copy_range or not isinstance(src, FileBackstore):
            return False
        done = 0
        try:
            while done < length:
                n = os.copy_file_range(src.fd, self.fd, length - done, src_offset + done,
                                       dst_offset + done)
                if n == 0:
                    self._write_zeros(dst_offset + done, length - done)
                    break
                done += n
            return True
        except OSError as exc:
            if not done and exc.errno in (errno.EXDEV, errno.EOPNOTSUPP, errno.ENOSYS,
                                          errno.EINVAL):
                self.caps.copy_range = False
                return False
            raise


def _new_file_from(src: int, path: str, size: int) -> str:
    """Create `path` (never an existing file) holding the `size` bytes of the open file `src`,
    durably; how ("reflink" or "copy")."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        method = _clone_or_copy(src, fd, size)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(path)
        raise
    os.close(fd)
    _fsync_directory(os.path.dirname(os.path.abspath(path)))
    return method


def _clone_or_copy(src: int, dst: int, size: int) -> str:
    """Make the empty file `dst` hold the first `size` bytes of `src`: FICLONE of the whole
    file ("reflink"), else a sparse copy of its data extents ("copy")."""
    if os.fstat(src).st_size == size:
        try:
            fcntl.ioctl(dst, FICLONE, src)
            return "reflink"
        except OSError as exc:
            if exc.errno not in _NO_REFLINK:
                raise
    os.ftruncate(dst, size)
    pos = 0
    while pos < size:
        try:
            data = os.lseek(src, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                break
            raise
        if data >= size:
            break
        hole = min(os.lseek(src, data, os.SEEK_HOLE), size)
        _copy_extent(src, dst, data, hole - data)
        pos = hole
    return "copy"


def _copy_extent(src: int, dst: int, offset: int, length: int) -> None:
    """Copy in the kernel (copy_file_range), or through a buffer across filesystems."""
    done = 0
    while done < length:
        try:
            n = os.copy_file_range(src, dst, length - done, offset + done, offset + done)
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise
            break
        if n == 0:
            raise OSError(errno.EIO, f"{offset + done}: the source ended early")
        done += n
    buf = bytearray(min(length - done, 1 << 20))
    while done < length:
        n = os.preadv(src, (memoryview(buf)[:length - done],), offset + done)
        if n == 0:
            raise OSError(errno.EIO, f"{offset + done}: the source ended early")
        os.pwrite(dst, memoryview(buf)[:n], offset + done)
        done += n


def _fsync_directory(path: str) -> None:
    dfd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def _zeros(n: int) -> bytes:
    return _ZEROS[:n] if n <= len(_ZEROS) else bytes(n)
