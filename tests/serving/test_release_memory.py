"""`runtime.release_free_memory`: freed heap pages go back to the OS (the server's flat RSS)."""

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
