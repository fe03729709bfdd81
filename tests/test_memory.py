"""Allocator settings for long conversions (glibc only; elsewhere these are no-ops)."""

from __future__ import annotations

import platform

import pytest

from mobe_stream import memory


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_mmap_threshold_is_accepted_by_glibc():
    assert memory.pin_mmap_threshold(1 << 20) is True
    memory.release_freed_memory()


def test_no_libc_is_a_quiet_no_op(monkeypatch):
    monkeypatch.setattr(memory, "_libc", None)
    assert memory.pin_mmap_threshold() is False
    memory.release_freed_memory()
