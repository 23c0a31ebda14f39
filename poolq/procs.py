"""Child processes that die with their parent."""

from __future__ import annotations

import ctypes
import ctypes.util
import signal
import sys

PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True) if sys.platform == "linux" else None


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """In a child (preexec_fn): receive ``sig`` when the parent dies (Linux; elsewhere a no-op)."""
    if _libc is not None:
        _libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0)
