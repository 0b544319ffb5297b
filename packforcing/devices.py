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
