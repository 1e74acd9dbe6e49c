"""Throughput of the served classifier: 16 concurrent clients against `mlflow models serve`,
1 worker and N workers side by side (a bench, not a test: it prints what it measured).

    .venv/bin/python bench/serve_throughput.py                  # workers 1 vs all cores
    .venv/bin/python bench/serve_throughput.py --workers 1 4 --requests 400

A tiny classifier (the demo preset and patch size by default) is saved, logged as the pyfunc
in a temporary MLflow store and served on 127.0.0.1 with `--env-manager local`, exactly as the
README's command does. Each setting: one request alone (median of 20), then `--clients`
threads sending one-patch PNG requests back to back; reported: requests/s, p50 and p99
latency. Each worker is a separate process holding its own copy of the model; torch's
intra-op threads per worker are set to cores // workers (OMP_NUM_THREADS), so the workers do
not oversubscribe the cores.
"""

from __future__ import annotations

import argparse
import base64
import io
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _png_b64(arr: np.ndarray) -> str:
    from PIL import Image

    from mammodp.data.imageio import to_uint16

    buf = io.BytesIO()
    Image.fromarray(to_uint16(arr)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def log_model(root: Path, preset: str, patch: int) -> str:
    """Save and log a random-weight classifier; return its model URI."""
    import mlflow
    import torch

    from mammodp.inference import save_classifier
    from mammodp.models.swin import create_classifier
    from mammodp.pyfunc_model import log_classifier

    torch.manual_seed(0)
    model = create_classifier(preset, pretrained_weights=None, mode="full").eval()
    meta = {"preset": preset, "mode": "full", "patch_size": patch, "margin": 16, "min_size": 48,
            "threshold": 0.5, "epsilon": 1.0}
    save_classifier(model, meta, root / "clf")
    mlflow.set_experiment("bench-serve")
    with mlflow.start_run():
        info = log_classifier(root / "clf", np.full((patch, patch), 0.5, np.float32))
    return info.model_uri


def serve(uri: str, workers: int, root: Path, env: dict) -> tuple[subprocess.Popen, str]:
    import requests

    port = _free_port()
    threads = max(1, (os.cpu_count() or 1) // workers)
    log = open(root / f"server-{workers}.log", "wb")
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "models", "serve", "-m", uri, "--env-manager", "local",
         "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers)],
        env={**env, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}, cwd=root,
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited {proc.returncode}: see {root}/server-{workers}.log")
        try:
            if requests.get(f"{url}/ping", timeout=2).status_code == 200:
                return proc, url
        except requests.ConnectionError:
            pass
        time.sleep(0.5)
    raise SystemExit("server did not answer /ping in 300 s")


def stop(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=wait)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


def measure(url: str, payloads: list[dict], clients: int) -> dict:
    import requests

    session = requests.Session()

    def one(payload: dict) -> float:
        t = time.perf_counter()
        r = session.post(f"{url}/invocations", json=payload, timeout=120)
        r.raise_for_status()
        return time.perf_counter() - t

    for p in payloads[:8]:  # warm-up (every worker's first requests)
        one(p)
    alone = statistics.median(one(p) for p in payloads[:20])
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=clients) as pool:
        lat = sorted(pool.map(one, payloads))
    wall = time.perf_counter() - t0
    return {"alone_ms": 1000 * alone, "rps": len(lat) / wall, "p50_ms": 1000 * lat[len(lat) // 2],
            "p99_ms": 1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", type=int, nargs="+", default=[1, max(2, os.cpu_count() or 2)])
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--requests", type=int, default=320, help="requests per setting (all clients together)")
    ap.add_argument("--preset", default="swin_micro")
    ap.add_argument("--patch", type=int, default=64)
    args = ap.parse_args()

    root = Path(tempfile.mkdtemp(prefix="mammodp-bench-serve-"))
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{root}/mlflow.db",
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")}
    os.environ["MLFLOW_TRACKING_URI"] = env["MLFLOW_TRACKING_URI"]
    os.chdir(root)
    uri = log_model(root, args.preset, args.patch)
    rng = np.random.default_rng(0)
    payloads = [{"dataframe_records": [{"image": _png_b64(rng.uniform(0, 1, (args.patch, args.patch)))}]}
                for _ in range(args.requests)]
    print(f"{args.preset} at {args.patch} px, {args.clients} concurrent clients, {args.requests} one-patch "
          f"requests per setting, {os.cpu_count()} CPU cores")
    print(f"{'workers':>7} {'threads/worker':>14} {'alone ms':>9} {'req/s':>7} {'p50 ms':>7} {'p99 ms':>7}")
    for workers in args.workers:
        proc, url = serve(uri, workers, root, env)
        try:
            m = measure(url, payloads, args.clients)
        finally:
            stop(proc)
        threads = max(1, (os.cpu_count() or 1) // workers)
        print(f"{workers:>7} {threads:>14} {m['alone_ms']:>9.1f} {m['rps']:>7.1f} {m['p50_ms']:>7.0f} "
              f"{m['p99_ms']:>7.0f}", flush=True)


if __name__ == "__main__":
    main()
