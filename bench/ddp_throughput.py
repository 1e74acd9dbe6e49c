"""Data-parallel DP-SGD throughput (records/s): N processes against 1, side by side in one run.

Each configuration trains the same model with the project's engine (`make_private`, fixed
sigma, Poisson batches at the same q) for the same number of logical steps, after a warm-up;
throughput = records in the timed batches / wall time (rank 0's clock, which the per-step
all-reduce keeps in step with the others). Configurations alternate over `--rounds`, and the
median per configuration is printed, so a busy machine slows all of them alike.

CPU (gloo):  python bench/ddp_throughput.py                       # 1x1, 1x2 threads, 2x1
CUDA (nccl): python bench/ddp_throughput.py --device cuda --preset swin_tiny --size 224
             (N = 1 and N = every visible GPU, one process each)
"""

from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import os
import socket
import statistics
import time
from pathlib import Path

import torch


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(rank: int, world: int, port: int, threads: int, args: dict, q: "mp.Queue") -> None:
    """One rank of one configuration; rank 0 puts (records, seconds) on the queue."""
    import numpy as np

    if world > 1:
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(threads)
    from mammodp.models.swin import create_classifier, trainable_parameters
    from mammodp.privacy import distributed, make_private

    ctx = distributed.setup(args["device"]) if world > 1 else None
    device = ctx.device if ctx is not None else torch.device(args["device"] if args["device"] != "cuda" else "cuda:0")
    torch.manual_seed(0)
    model = create_classifier(args["preset"], mode="full").to(device)
    opt = torch.optim.AdamW(trainable_parameters(model), lr=1e-4)
    n = args["records"]
    g = torch.Generator().manual_seed(1)
    x = torch.rand(n, 1, args["size"], args["size"], generator=g)
    y = torch.randint(0, 2, (n,), generator=g)
    engine = make_private(model, opt, record_ids=np.arange(n), expected_batch_size=args["batch"], delta=1e-5,
                          epochs=1, max_grad_norm=1.0, noise_multiplier=1.0, accountant="rdp", sampler_seed=0,
                          grad_chunk=args["batch"], physical_batch_size=args["batch"], per_sample_method="hooks",
                          autocast_dtype=torch.bfloat16 if device.type == "cuda" else None)
    if ctx is not None:
        ctx.make_data_parallel(engine, seed=0)
        ctx.broadcast_module(model)
    loss_fn = torch.nn.CrossEntropyLoss()
    records, start = 0, 0.0
    for step in range(args["warmup"] + args["steps"]):
        if step == args["warmup"]:
            if device.type == "cuda":
                torch.cuda.synchronize()
            records, start = 0, time.perf_counter()
        idx = engine.sample_batch()
        engine.step(x[idx], y[idx], loss_fn, record_idx=idx)
        opt.step()
        opt.zero_grad(set_to_none=True)
        records += engine.last_stats["records"]  # global count (all-reduced)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    if rank == 0:
        q.put((records, seconds))
    if ctx is not None:
        distributed.shutdown()


def measure(world: int, threads: int, args: dict) -> float:
    """Records per second of one configuration (fresh processes)."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_run, args=(r, world, port, threads, args, q)) for r in range(world)]
    for p in procs:
        p.start()
    records, seconds = q.get(timeout=1800)
    for p in procs:
        p.join()
    return records / seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--preset", default="swin_micro")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--records", type=int, default=512)
    ap.add_argument("--batch", type=int, default=32, help="expected records per logical step")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    a = ap.parse_args()
    args = vars(a)
    if a.device == "cuda":
        gpus = torch.cuda.device_count()
        configs = [(1, 1), (gpus, 1)] if gpus > 1 else [(1, 1)]
    else:
        configs = [(1, 1), (1, 2), (2, 1)]  # (processes, threads each)
    results: dict[tuple[int, int], list[float]] = {c: [] for c in configs}
    for _ in range(a.rounds):
        for c in configs:
            results[c].append(measure(*c, args))
    base = statistics.median(results[(1, 1)])
    print(f"DP-SGD throughput, {a.preset} at {a.size} px, expected batch {a.batch}, {a.device}, "
          f"median of {a.rounds} interleaved rounds of {a.steps} steps")
    print("| processes x threads | records/s | vs 1 x 1 |")
    print("| --- | --- | --- |")
    for (world, threads), vals in results.items():
        med = statistics.median(vals)
        print(f"| {world} x {threads} | {med:.1f} | {med / base:.2f}x |")
    if a.json:
        import json

        a.json.write_text(json.dumps({f"{w}x{t}": statistics.median(v) for (w, t), v in results.items()}, indent=2))
    assert all(math.isfinite(statistics.median(v)) for v in results.values())


if __name__ == "__main__":
    main()
