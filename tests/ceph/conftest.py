"""Fixtures of the `ceph` tests. The session's throw-away cluster, `ceph_cluster`, is in
tests/conftest.py, so that tests elsewhere (tests/interop) share the same one."""

from __future__ import annotations

import uuid

import pytest


@pytest.fixture
def image_name() -> str:
    """A fresh image name: tests share the session's cluster and pool."""
    return f"img-{uuid.uuid4().hex[:12]}"
