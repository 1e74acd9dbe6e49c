"""glibc's allocator, both ways: a server gives freed memory back (`runtime.release_free_memory`,
its RSS stays flat), a training process keeps it for the next step (`runtime.keep_freed_memory`,
no page faults on memory it had a step ago)."""

import ctypes.util
import subprocess
import sys
import textwrap

import pytest

GLIBC = sys.platform.startswith("linux") and "libc.so" in (ctypes.util.find_library("c") or "")

SCRIPT = textwrap.dedent("""
    import sys
    from mammodp.runtime import release_free_memory

    def rss_mib():
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024

    base = rss_mib()
    # 300 MB in 100 KB blocks: under glibc's mmap threshold, so they live on the heap; the
    # last block stays alive and pins the heap's top, so free() alone cannot shrink it.
    blocks = [bytearray(b"x" * 100_000) for _ in range(3000)]
    keep = blocks[-1]
    del blocks
    freed = rss_mib()
    ok = release_free_memory()
    trimmed = rss_mib()
    print(ok, round(base), round(freed), round(trimmed))
""")


@pytest.mark.skipif(not GLIBC, reason="malloc_trim is glibc's")
def test_freed_heap_is_returned_to_the_os():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, check=True).stdout
    ok, base, freed, trimmed = out.split()
    base, freed, trimmed = int(base), int(freed), int(trimmed)
    assert ok == "True"
    assert freed - base > 200, out  # free() kept the pages: the creep the server saw
    assert trimmed - base < 50, out  # the trim gave them back


def test_is_a_safe_no_op_to_call_twice():
    from mammodp.runtime import release_free_memory

    assert release_free_memory() == release_free_memory()


KEEP = textwrap.dedent("""
    import sys
    from mammodp.runtime import keep_freed_memory

    def rss_mib():
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024

    ok = keep_freed_memory() if sys.argv[1] == "keep" else None
    base = rss_mib()
    # 300 MB in 1 MB blocks (a step's activations): above glibc's default mmap threshold
    # (128 KiB), so by default each is its own mapping and is unmapped when freed.
    blocks = [bytearray(b"x" * 1_000_000) for _ in range(300)]
    del blocks
    print(ok, round(base), round(rss_mib()))
""")


@pytest.mark.skipif(not GLIBC, reason="mallopt is glibc's")
def test_training_keeps_freed_memory_for_the_next_step():
    def run(mode):
        out = subprocess.run([sys.executable, "-c", KEEP, mode], capture_output=True, text=True, check=True).stdout
        ok, base, after = out.split()
        return ok, int(after) - int(base)

    ok, kept = run("keep")
    _, default = run("default")
    assert ok == "True"
    assert default < 50, default  # glibc's defaults: freed 1 MB blocks went back to the OS
    assert kept > 250, kept  # kept: the next step reuses them without faulting them in


def test_to_device_on_the_cpu_is_a_plain_move():
    import torch

    from mammodp.runtime import to_device

    # Pinning needs CUDA (it raises on a machine without it): a CPU target copies nothing.
    t = torch.arange(5)
    assert to_device(t, "cpu") is t
    assert to_device(t, torch.device("cpu")) is t
    assert to_device(t, "meta").device.type == "meta"
