"""Peers sharing one GPU: they register per GPU, load one at a time, and count each other."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

from layerswarm.peer.gpu_share import LOADING, SERVING, GpuShare


def test_peers_of_one_gpu_count_each_other_by_state(tmp_path: Path) -> None:
    me = GpuShare(tmp_path, "GPU-1234")
    other = GpuShare(tmp_path, "GPU-1234", pid=1)  # init: a live process
    elsewhere = GpuShare(tmp_path, "GPU-5678", pid=1)
    assert me.peers() == 2 and me.peers(LOADING) == 2
    with me:
        pass
    assert me.peers(LOADING) == 1 and me.peers(SERVING) == 1
    other.leave()
    assert me.peers() == 1
    assert elsewhere.peers() == 1


def test_an_entry_of_a_dead_process_is_dropped(tmp_path: Path) -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # its PID names no live process now
    GpuShare(tmp_path, "GPU-1", pid=child.pid)
    me = GpuShare(tmp_path, "GPU-1")
    assert me.peers() == 1
    assert sorted(p.name for p in me.folder.iterdir()) == [str(me.pid)]


def test_peers_of_one_gpu_load_one_at_a_time(tmp_path: Path) -> None:
    first, second = GpuShare(tmp_path, "GPU-1"), GpuShare(tmp_path, "GPU-1", pid=1)
    order: list[str] = []
    first.__enter__()

    def load_second() -> None:
        with second:
            order.append("second loads")

    worker = threading.Thread(target=load_second)
    worker.start()
    time.sleep(0.3)  # time for the second to reach the lock (not a timing assertion)
    order.append("first done")
    first.__exit__(None, None, None)
    worker.join(timeout=10)
    assert order == ["first done", "second loads"]
