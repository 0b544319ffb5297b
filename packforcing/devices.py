"""Device facts used across the project: free memory, and a synchronise that is a no-op off CUDA."""

from __future__ import annotations

import torch


def available_memory(device) -> int | None:
    """Free memory in bytes on ``device`` (CUDA: free + cached by PyTorch; CPU: MemAvailable), or None."""
    device = torch.device(device)
    try:
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
        if device.type == "cpu":
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
    except (OSError, RuntimeError, ValueError):
        pass
    return None


def synchronize(device) -> None:
    """Wait for queued CUDA work on ``device`` (timers around GPU work need it); nothing elsewhere."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def release_host_memory() -> bool:
    """Give the heap pages freed since the last call back to the OS (glibc ``malloc_trim(0)``).

    The served app's resident memory otherwise creeps up run after run although Python frees every
    object (measured: `scripts/soak_served.py`, +7 % over 90 runs, all of it returned by a trim,
    none by ``gc.collect()``): glibc keeps freed memory in its arenas. A few milliseconds; False
    where the C library has no ``malloc_trim`` (not glibc)."""
    import ctypes
    import ctypes.util

    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        except OSError:
            _LIBC = False
    trim = getattr(_LIBC, "malloc_trim", None) if _LIBC else None
    if trim is None:
        return False
    trim(0)
    return True


_LIBC = None
