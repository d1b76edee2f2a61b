"""Backing stores for logical units, by the configuration key that names their kind.

`KINDS` maps `backstore: <kind>` to the class; `open_backstore` and `provision_backstore` build
one from plain parameters (for a file: `{"path": ...}`; for RBD: `{"pool": ..., "image": ...}`
and the connection's). The interface itself is
`base.Backstore`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .base import Backstore
from .file import FileBackstore
from .rbd import RbdBackstore

KINDS: dict[str, type[Backstore]] = {
    FileBackstore.kind: FileBackstore,
    RbdBackstore.kind: RbdBackstore,
}


def backstore_kind(kind: str) -> type[Backstore]:
    """The class of a kind; ValueError naming the known kinds for any other."""
    try:
        return KINDS[kind]
    except KeyError:
        known = ", ".join(sorted(KINDS))
        raise ValueError(f"unknown backstore {kind!r} (known: {known})") from None


def open_backstore(kind: str, params: Mapping[str, Any], *, readonly: bool = False) -> Backstore:
    """Open the existing medium `params` name."""
    cls = backstore_kind(kind)
    cls.check_params(params)
    return cls.open(params, readonly=readonly)


def provision_backstore(kind: str, params: Mapping[str, Any], size: int) -> bool:
    """Create the medium unless it exists; True when it was created."""
    cls = backstore_kind(kind)
    cls.check_params(params)
    if cls.exists(params):
        return False
    cls.provision(params, size)
    return True
