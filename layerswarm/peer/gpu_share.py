"""Peers that share one GPU (separate processes): they load one at a time, and split its memory.

Each peer on a GPU registers a file named by its PID in a folder of that GPU (by UUID), saying
whether it is still loading. While a peer chooses its span and loads it, it holds the folder's
lock (`fcntl.flock`), so the next peer measures the free VRAM only after the first took its
share. The default budget splits what is free evenly among the peers still loading
(`placement.memory_budget`), and a record announces an equal part of the GPU's free and total
memory (`placement.device_share`), so that two peers on one 24 GB card do not both claim 24 GB.

A file whose process is gone (killed with -9) is ignored and removed by the next reader.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from types import TracebackType

LOADING, SERVING = "loading", "serving"


class GpuShare:
    """This process's entry among the peers of one GPU."""

    def __init__(self, root: Path, gpu: str, pid: int | None = None) -> None:
        """`root`: the folder of every GPU's registry (a runtime dir); `gpu`: its UUID."""
        self.folder = root / "".join(c if c.isalnum() or c in "-_" else "_" for c in gpu)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.pid = os.getpid() if pid is None else pid
        self._entry = self.folder / str(self.pid)
        self._lock: int | None = None
        self._entry.write_text(LOADING)

    def peers(self, state: str | None = None) -> int:
        """Live peers on this GPU (in `state`, if given), this one included."""
        count = 0
        for entry in self.folder.iterdir():
            if not entry.name.isdigit():
                continue
            if not _alive(int(entry.name)):
                entry.unlink(missing_ok=True)
                continue
            try:
                current = entry.read_text()
            except OSError:  # removed meanwhile
                continue
            count += state is None or current == state
        return count

    def __enter__(self) -> GpuShare:
        """Wait for this GPU's loading lock (blocking: call it off the event loop)."""
        self._lock = os.open(self.folder / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self._lock, fcntl.LOCK_EX)
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        """Done loading (or failed): serving from now on, and the next peer may load."""
        self._entry.write_text(SERVING)
        if self._lock is not None:
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            os.close(self._lock)
            self._lock = None

    def leave(self) -> None:
        self._entry.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def gpu_key(index: int) -> str:
    """A name for CUDA device `index` that other processes see the same: its UUID when torch
    gives it (CUDA_VISIBLE_DEVICES may renumber devices per process), else its PCI bus."""
    import torch

    props = torch.cuda.get_device_properties(index)
    uuid = getattr(props, "uuid", None)
    if uuid is not None:
        return str(uuid)
    return f"pci-{getattr(props, 'pci_bus_id', index)}"
