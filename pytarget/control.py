"""The control socket: a local unix socket over which `pytarget status` and `pytarget reload`
talk to the running target.

One request per connection: the client sends one JSON object on one line
(`{"command": "status"}`), the target answers with one JSON object on one line
(`{"ok": true, "result": ...}` or `{"ok": false, "error": "..."}`) and closes. Access control is
the socket file's permissions: 0600 (the target's own user), or 0660 with `control_group`.

The socket is `control_socket` from the configuration or, by default, the configuration file's
name with `.sock` next to it (`luns/default.yaml` → `luns/default.sock`), so every instance has
its own and the command line finds it from the same `--config`.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import grp
import json
import logging
import os
import socket
import stat
import struct
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

from .config import DEFAULT_CONFIG, Config

log = logging.getLogger("pytarget.control")

MAX_REQUEST = 65536
REQUEST_TIMEOUT = 10.0
_PATH_MAX = 100  # sun_path holds 108 bytes; longer paths go through /proc/self/fd

Handler = Callable[[str, dict[str, Any], int | None], Awaitable[Any]]


class ControlError(Exception):
    """The control socket cannot be reached, or the target refused the request."""


def socket_path(config: Config) -> Path:
    """Where the target listens for control requests (see the module docstring)."""
    if config.control_socket is not None:
        return config.control_socket
    source = Path(config.file)
    if not source.is_file():  # the built-in default: as if luns/default.yaml existed
        source = config.base / DEFAULT_CONFIG.name
    # Gateways sharing one file on one machine each have their own socket.
    gateway = f".{config.gateway}" if config.gateway is not None else ""
    return source.resolve().parent / f"{source.stem}{gateway}.sock"


@contextlib.contextmanager
def _addressable(path: Path) -> Iterator[str]:
    """A name for `path` that fits in sun_path: itself, or a /proc/self/fd alias of it."""
    text = str(path)
    if len(text.encode()) < _PATH_MAX:
        yield text
        return
    fd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield f"/proc/self/fd/{fd}/{path.name}"
    finally:
        os.close(fd)


def _answers(path: Path) -> bool:
    """Is a process listening on the unix socket at `path`?"""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe, _addressable(path) as name:
        probe.settimeout(1.0)
        try:
            probe.connect(name)
        except OSError:
            return False
    return True


class ControlServer:
    """Listens on the control socket and hands each request to `handler`."""

    def __init__(self, path: Path, handler: Handler, group: str | None = None) -> None:
        self.path = path
        self.handler = handler
        self.group = group
        self.server: asyncio.base_events.Server | None = None
        self._inode: tuple[int, int] | None = None

    async def start(self) -> None:
        """Bind the socket (0600, or 0660 with the group) and serve; OSError when it cannot."""
        gid = grp.getgrnam(self.group).gr_gid if self.group else None
        path = self.path
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        if path.exists() or path.is_symlink():
            if not stat.S_ISSOCK(path.lstat().st_mode):
                raise OSError(errno.EEXIST, "exists and is not a socket", str(path))
            if _answers(path):
                raise OSError(errno.EADDRINUSE, "another pytarget answers there", str(path))
            path.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            old_umask = os.umask(0o177)
            try:
                with _addressable(path) as name:
                    sock.bind(name)
            finally:
                os.umask(old_umask)
            if gid is not None:
                os.chown(path, -1, gid)
                os.chmod(path, 0o660)
            sock.listen(16)
            sock.setblocking(False)
            self.server = await asyncio.start_unix_server(self._serve, sock=sock)
        except BaseException:
            sock.close()
            with contextlib.suppress(OSError):
                path.unlink()
            raise
        st = path.stat()
        self._inode = (st.st_dev, st.st_ino)
        log.info("control socket %s (mode %o%s)", path, stat.S_IMODE(st.st_mode),
                 f", group {self.group}" if self.group else "")

    async def close(self) -> None:
        if self.server is None:
            return
        self.server.close()
        self.server = None
        with contextlib.suppress(OSError):
            st = self.path.stat()
            if (st.st_dev, st.st_ino) == self._inode:
                self.path.unlink()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        uid = _peer_uid(writer)
        try:
            try:
                line = await asyncio.wait_for(reader.readline(), REQUEST_TIMEOUT)
                if len(line) > MAX_REQUEST or not line.endswith(b"\n"):
                    raise ControlError("request too long or incomplete")
                request = json.loads(line)
                if not isinstance(request, dict) or not isinstance(request.get("command"), str):
                    raise ControlError('expected {"command": NAME, ...}')
                result = await self.handler(request["command"], request, uid)
                answer: dict[str, Any] = {"ok": True, "result": result}
            except (TimeoutError, ControlError, ValueError) as exc:
                answer = {"ok": False, "error": str(exc) or type(exc).__name__}
            except Exception as exc:  # the target goes on; the client learns what happened
                log.exception("control request failed")
                answer = {"ok": False, "error": f"internal error: {exc!r}"}
            writer.write(json.dumps(answer, default=str).encode() + b"\n")
            await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()


async def start_control(config: Config, handler: Handler) -> ControlServer | None:
    """The control socket of `config` serving `handler`, started; None, with a warning, when
    it cannot be made (the target runs on without it)."""
    path = socket_path(config)
    control = ControlServer(path, handler, config.control_group)
    try:
        await control.start()
    except (OSError, KeyError) as exc:
        reason = f"no group {config.control_group}" if isinstance(exc, KeyError) \
            else (exc.strerror or str(exc))
        log.warning("no control socket at %s (%s): `pytarget status` and `pytarget "
                    "reload` cannot reach this target; SIGHUP still reloads", path, reason)
        return None
    return control


def _peer_uid(writer: asyncio.StreamWriter) -> int | None:
    sock = writer.get_extra_info("socket")
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except (OSError, AttributeError):
        return None
    return int(struct.unpack("3i", creds)[1])


def request(path: Path, command: str, timeout: float = 120.0, **arguments: Any) -> Any:
    """Send one request to the target listening at `path`; its result, or ControlError."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock, _addressable(path) as name:
        sock.settimeout(timeout)
        try:
            sock.connect(name)
        except FileNotFoundError:
            raise ControlError(f"no control socket at {path}: is the target running "
                               "with this configuration?") from None
        except ConnectionRefusedError:
            raise ControlError(f"nothing listens on {path}: the target is not running") from None
        except PermissionError:
            raise ControlError(f"permission denied on {path}: run as the target's user or a "
                               "member of its control_group") from None
        except OSError as exc:
            raise ControlError(f"cannot connect to {path}: {exc.strerror or exc}") from None
        sock.sendall(json.dumps({"command": command, **arguments}).encode() + b"\n")
        chunks = []
        try:
            while True:
                chunk = sock.recv(1 << 16)
                if not chunk:
                    break
                chunks.append(chunk)
        except TimeoutError:
            raise ControlError(f"no answer from {path} within {timeout:.0f} s") from None
    try:
        answer = json.loads(b"".join(chunks))
    except ValueError:
        raise ControlError(f"the target at {path} sent no valid answer") from None
    if not answer.get("ok"):
        raise ControlError(str(answer.get("error", "request failed")))
    return answer.get("result")
