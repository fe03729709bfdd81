"""Give freed heap memory back to the OS between units of work.

Long conversions allocate and free many transient buffers (JSON of a growing journal, header
dicts, per-expert temporaries); glibc keeps freed heap pages, so RSS creeps up with depth even
though nothing is leaked. malloc_trim(0) returns them. A no-op where glibc is not the allocator.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc

_libc = None
try:
    _name = ctypes.util.find_library("c")
    if _name:
        _libc = ctypes.CDLL(_name)
        _libc.malloc_trim.argtypes = [ctypes.c_size_t]
except (OSError, AttributeError):
    _libc = None


def release_freed_memory() -> None:
    gc.collect()
    if _libc is not None:
        try:
            _libc.malloc_trim(0)
        except AttributeError:
            pass
