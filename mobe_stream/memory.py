"""Give freed heap memory back to the OS between units of work.

Long conversions allocate and free many transient buffers (JSON of a growing journal, header
dicts, per-expert temporaries); glibc keeps freed heap pages, so RSS creeps up with depth even
though nothing is leaked. malloc_trim(0) returns them. A no-op where glibc is not the allocator.

glibc also raises its mmap threshold each time a large mmapped block is freed (up to 32 MiB), after
which layer-sized tensors come from the heap and fragment it; the peak then drifts up with depth.
`pin_mmap_threshold()` fixes the threshold so large tensors are always mmapped and unmapped on free.
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


M_MMAP_THRESHOLD = -3  # mallopt parameter number (glibc malloc.h)


def pin_mmap_threshold(nbytes: int = 1 << 20) -> bool:
    """Allocations of at least `nbytes` always get their own mmap (and setting it stops the dynamic
    adjustment). True if glibc accepted it."""
    if _libc is None:
        return False
    try:
        return bool(_libc.mallopt(M_MMAP_THRESHOLD, int(nbytes)))
    except AttributeError:
        return False


def release_freed_memory() -> None:
    gc.collect()
    if _libc is not None:
        try:
            _libc.malloc_trim(0)
        except AttributeError:
            pass
