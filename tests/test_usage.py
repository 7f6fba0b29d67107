"""agents.usage: per-thread CPU time and context switches from /proc, per message."""

from __future__ import annotations

import os
import threading
import time

from agents import usage
from agents.durable import DiskThread, _name_os_thread


def spin(seconds: float) -> None:
    """Burn CPU (not wall-clock time) for ``seconds``."""
    start = time.thread_time()
    while time.thread_time() - start < seconds:
        pass


def test_a_snapshot_counts_this_process_and_its_threads():
    me = os.getpid()
    before = usage.snapshot({"me": me})
    ready, done = threading.Event(), threading.Event()

    def worker():
        _name_os_thread("worker")
        spin(0.15)
        for _ in range(20):  # sleeping is a voluntary switch: the thread gives up the CPU
            time.sleep(0.001)
        ready.set()
        done.wait(5)

    thread = threading.Thread(target=worker)
    thread.start()
    assert ready.wait(5)
    spin(0.1)
    after = usage.snapshot({"me": me})
    done.set()
    thread.join()
    [cost] = usage.per_message(before, after, messages=10)
    assert cost.agent == "me" and set(cost.threads) >= {"main", "worker"}
    cpu_ms, voluntary, _ = cost.threads["worker"]  # started after `before`: counted from zero
    assert 12 <= cpu_ms <= 30 and voluntary >= 2  # 150 ms over 10 messages; 20 sleeps / 10
    assert cost.threads["main"][0] >= 8
    assert cost.cpu_ms >= cost.threads["main"][0] + cpu_ms - 2  # the whole process, in ticks
    assert cost.syscalls >= 0


def test_an_ended_thread_still_counts_in_its_process_total():
    me = os.getpid()
    before = usage.snapshot({"me": me})
    thread = threading.Thread(target=spin, args=(0.2,))
    thread.start()
    thread.join()
    after = usage.snapshot({"me": me})
    [cost] = usage.per_message(before, after, messages=1)
    assert cost.cpu_ms >= 180 and sum(c for c, _, _ in cost.threads.values()) < 100


def test_the_disk_thread_shows_its_name_to_the_kernel():
    class Reactor:
        def callFromThread(self, f, *args):
            pass

    disk, seen = DiskThread(Reactor()), threading.Event()
    tids = []
    disk.run(lambda: tids.append(threading.get_native_id()) or seen.set())
    assert seen.wait(5)
    with open(f"/proc/self/task/{tids[0]}/comm") as comm:
        assert comm.read().strip() == "disk"
    usage_now = usage.process_usage(os.getpid())
    assert usage_now.threads[tids[0]].name == "disk"
    disk.stop()
