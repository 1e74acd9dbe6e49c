"""Seeds and devices: one seed drives python, numpy and torch."""

from __future__ import annotations

import os
import random

import numpy as np


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA) from one integer."""
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    os.environ.setdefault("PYTHONHASHSEED", str(seed))


def resolve_device(name: str = "auto"):
    """`auto` picks CUDA when present, else CPU; anything else is passed to torch.device."""
    import torch

    from mammodp.errors import ConfigError

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("CUDA was requested but is not available on this machine", field="device")
    return dev


def to_device(t, device):
    """A host tensor on `device`, copied without making the host wait for the device.

    A CUDA copy from pageable host memory may synchronise with the stream first, whatever
    `non_blocking` says (CUDA runtime API, "API synchronization behavior"; torch's sync debug
    mode does not see it): the host then waits for every queued kernel, e.g. the previous
    optimiser step, before it can queue the next batch. From pinned memory (torch's caching
    host allocator: reused, kept alive until the copy's stream has passed it) the copy is
    queued like a kernel. Elsewhere a plain `to(device)`."""
    import torch

    device = torch.device(device)
    if device.type == "cuda" and t.device.type == "cpu":
        if not t.is_pinned():
            # dense first: a strided view would be made contiguous for the copy, in pageable memory
            t = t.contiguous().pin_memory()
        return t.to(device, non_blocking=True)
    return t.to(device)


GPU_POOL_ENV = "MAMMODP_GPU_POOL"
_GPU_LOCK = None  # the lock file held for this process's lifetime


def claim_gpu(lock_dir: str | None = None) -> str | None:
    """Give this process one GPU of the pool in `$MAMMODP_GPU_POOL` (e.g. `0,1,2,3`).

    Concurrent jobs of one machine (a DVC queue's workers) each hold a different GPU: the
    first free id is locked (`flock` on `<lock_dir>/mammodp-gpu-<id>.lock`, released when
    the process ends, also when it dies) and exported as `CUDA_VISIBLE_DEVICES`, before CUDA
    starts. Does nothing when the pool is unset, under torchrun (its ranks pick
    `cuda:LOCAL_RANK`) or when `CUDA_VISIBLE_DEVICES` names one device already.

    Returns:
        The GPU id claimed, or None. Waits for a free one if all are held.
    """
    import fcntl
    import tempfile
    import time

    global _GPU_LOCK
    pool = [g.strip() for g in os.environ.get(GPU_POOL_ENV, "").split(",") if g.strip()]
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    if not pool or "LOCAL_RANK" in os.environ or (visible and "," not in visible) or _GPU_LOCK is not None:
        return None
    folder = lock_dir or tempfile.gettempdir()
    while True:
        for gpu in pool:
            f = open(os.path.join(folder, f"mammodp-gpu-{gpu}.lock"), "w")
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                f.close()
                continue
            _GPU_LOCK = f
            os.environ["CUDA_VISIBLE_DEVICES"] = gpu
            return gpu
        time.sleep(1.0)


def map_chunks(fn, items, workers: int, *, desc: str | None = None, unit: str = "item") -> list:
    """`fn` over consecutive chunks of `items` in up to `workers` processes; the results
    (one list or array per chunk, as `fn` returns them) in order.

    For work that is independent per item and CPU-bound in Python (radiomics extraction):
    `fn` must be picklable (a module-level function or a `functools.partial` of one). With
    `workers <= 1` (or a single chunk) everything runs in this process. A progress bar
    (`desc`) advances as chunks finish. An exception in a worker is raised here.
    """
    from concurrent.futures import ProcessPoolExecutor

    from tqdm.auto import tqdm

    n = len(items)
    if n == 0:
        return []
    n_chunks = 1 if workers <= 1 else min(n, 4 * workers)  # a few chunks each: balance, and progress
    bounds = np.linspace(0, n, n_chunks + 1).astype(int)
    chunks = [items[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    bar = tqdm(total=n, desc=desc, unit=unit, disable=desc is None)
    try:
        if n_chunks == 1:
            out = [fn(chunks[0])]
            bar.update(n)
            return out
        with ProcessPoolExecutor(max_workers=workers) as pool:
            futures = [pool.submit(fn, c) for c in chunks]
            for fut, c in zip(futures, chunks):
                fut.result()  # in order: the bar moves as the earliest pending chunk is done
                bar.update(len(c))
            return [f.result() for f in futures]
    finally:
        bar.close()


_LIBC = None  # glibc, looked up once; False where the C library is not glibc


def _glibc():
    global _LIBC
    if _LIBC is None:
        import ctypes
        import ctypes.util

        try:
            lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            lib.malloc_trim.argtypes, lib.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
            lib.mallopt.argtypes, lib.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
            _LIBC = lib
        except (OSError, AttributeError):
            _LIBC = False
    return _LIBC


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3


def keep_freed_memory(mmap_threshold_mib: int = 32, top_pad_mib: int = 64) -> bool:
    """Make glibc keep and reuse freed memory in a training process (CPU steps).

    A training step allocates and frees the same tensors every step. glibc's defaults give
    the heap's top back to the OS whenever the step's last large tensors are freed, and
    serve blocks above its mmap threshold with fresh pages: the next step then pays
    thousands of page faults and touches cold memory (a DP step, which frees more at once,
    more than a plain one). Here blocks up to `mmap_threshold_mib` come from the heap, the
    heap is never trimmed, and it grows `top_pad_mib` at a time, so the resident size
    settles at the step's peak and stays. Not for a long-lived server that sees rare large
    requests (it does the opposite, `release_free_memory`). False, and no change, where the
    C library is not glibc.
    """
    lib = _glibc()
    if not lib:
        return False
    ok = lib.mallopt(_M_MMAP_THRESHOLD, int(mmap_threshold_mib) << 20)
    ok &= lib.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)
    ok &= lib.mallopt(_M_TOP_PAD, int(top_pad_mib) << 20)
    return bool(ok)


def release_free_memory() -> bool:
    """Hand the allocator's freed-but-kept heap pages back to the OS (glibc's `malloc_trim(0)`).

    A server that decodes multi-megapixel images in a thread pool frees hundreds of MB per
    request into glibc arenas, which keep them: without a trim its resident size creeps with
    every large request. A no-op returning False where the C library has no `malloc_trim`
    (musl, macOS, Windows).
    """
    lib = _glibc()
    if not lib:
        return False
    lib.malloc_trim(0)
    return True
