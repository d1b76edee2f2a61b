"""Build step: the data path's modules compiled to C extensions by mypyc, from the same typed
source; the package stays pure Python wherever that cannot be done.

`python3 -m pip install .` compiles the modules in `COMPILED` (a C compiler and the Python
headers are needed; mypy comes in as a build requirement). If compiling fails, or for an
editable install (`pip install -e .`, whose in-tree extensions would shadow the sources being
edited), or with PYTARGET_PURE=1, the same package installs as pure Python;
PYTARGET_COMPILE=required makes a failure to compile an error instead (tools/build-compiled).
What compiling gains: docs/performance.md, "The compiled data path"; what it asks of the
code: docs/architecture.md, "The compiled data path".
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_ext import build_ext

# The modules every small command passes through (receive, parse, CmdSN window, dispatch,
# range lock, I/O, response, send) and those that subclass their classes.
COMPILED = [
    "pytarget/transport.py",
    "pytarget/iscsi/pdu.py",
    "pytarget/iscsi/framing.py",
    "pytarget/iscsi/connection.py",
    "pytarget/iscsi/fabric.py",
    "pytarget/iscsi/session.py",
    "pytarget/iscsi/datain.py",
    "pytarget/iscsi/dataout.py",
    "pytarget/iscsi/params.py",
    "pytarget/iscsi/bounds.py",
    "pytarget/core/task.py",
    "pytarget/core/locks.py",
    "pytarget/core/cdb.py",
    "pytarget/core/buffers.py",
    "pytarget/core/stats.py",
    "pytarget/core/sense.py",
    "pytarget/scsi/device.py",
    "pytarget/scsi/sbc.py",
    "pytarget/scsi/modes.py",
    "pytarget/backstore/file.py",
    "pytarget/initiator/protocol.py",
]


# Commands that only describe the package need no C source generated.
_METADATA_ONLY = {"dist_info", "egg_info", "sdist", "--name", "--version"}


def _pure_reason() -> str | None:
    if _METADATA_ONLY.intersection(sys.argv[1:]):
        return "metadata only"
    if os.environ.get("PYTARGET_PURE") == "1":
        return "PYTARGET_PURE=1"
    if "editable_wheel" in sys.argv:
        return "an editable install runs its sources"
    return None


class OptionalBuildExt(build_ext):
    """Builds the compiled modules, or none of them: a module whose extension was built
    while another's failed would import a shared library that is not there."""

    def finalize_options(self) -> None:
        super().finalize_options()
        if self.parallel is None:
            self.parallel = os.cpu_count() or 1

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # a compiler error, missing headers: install pure Python
            if os.environ.get("PYTARGET_COMPILE") == "required":
                raise
            self.warn(f"pytarget: compiling the data path failed ({exc}); "
                      "installing it as pure Python")
            for ext in self.extensions:
                Path(self.get_ext_fullpath(ext.name)).unlink(missing_ok=True)
            self.extensions = []


def _extensions() -> list[object]:
    reason = _pure_reason()
    if reason is not None:
        if reason != "metadata only":
            print(f"pytarget: pure Python ({reason})", file=sys.stderr)
        return []
    try:
        from mypyc.build import mypycify

        return list(mypycify(COMPILED, opt_level="3", group_name="pytarget_native"))
    except (Exception, SystemExit) as exc:  # mypyc missing, or refusing the source
        if os.environ.get("PYTARGET_COMPILE") == "required":
            raise
        print(f"pytarget: not compiled ({exc!r}); installing pure Python", file=sys.stderr)
        return []


setup(ext_modules=_extensions(), cmdclass={"build_ext": OptionalBuildExt})
