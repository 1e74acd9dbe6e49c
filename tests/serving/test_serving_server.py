"""A real `mlflow models serve` of a registered classifier, on 127.0.0.1 at a free port.

The model is a real (tiny) Swin classifier saved with `save_classifier`, logged with
`log_classifier` inside a run tagged like a train run, registered in a temporary SQLite
registry and served by alias, exactly as the README's command does.
"""

from __future__ import annotations

import base64
import io
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

requests = pytest.importorskip("requests")

pytestmark = pytest.mark.slow  # starts a real server (~25 s on 2 cores)

MODEL_NAME = "mammodp-classifier"
PATCH = 32
# Small serving limits (`serve.*` as training writes them into meta.json) keep the large-request
# tests quick: 2000x2000 images at most, boxes up to 1024 px, 16 patches per request.
LIMITS = {"max_image_pixels": 4_000_000, "max_roi_side": 1024, "max_rows": 16}
META = {"preset": "swin_micro", "mode": "full", "patch_size": PATCH, "margin": 4, "min_size": 16,
        "threshold": 0.5, "epsilon": 0.987, "epsilon_target": 1.0, "delta": 1e-4, "serve": LIMITS}


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


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(base URL, in-process model) of a champion served by `mlflow models serve`."""
    import mlflow
    import torch

    from mammodp.models.swin import create_classifier
    from mammodp.pyfunc_model import log_classifier
    from mammodp.inference import save_classifier

    root = tmp_path_factory.mktemp("serve")
    uri = f"sqlite:///{root}/mlflow.db"
    # `mlflow models serve` execs `uvicorn` from PATH: the venv's bin must come first, as it
    # does in an activated venv (the README's command).
    venv_bin = str(Path(sys.executable).parent)
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PATH": venv_bin + os.pathsep + os.environ.get("PATH", "")}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.chdir(root)  # MLflow's artifact store (./mlruns) lands in the temp folder
        torch.manual_seed(0)
        model = create_classifier("swin_micro", pretrained_weights=None, mode="full")
        model.eval()
        save_classifier(model, META, root / "clf")
        mlflow.set_experiment("test-serving")
        with mlflow.start_run(tags={"stage": "train", "epsilon": "1", "delta": "0.0001",
                                    "privacy_unit": "patch", "regime": "real"}) as run:
            log_classifier(root / "clf", np.full((PATCH, PATCH), 0.5, np.float32))
        client = mlflow.MlflowClient()
        version = mlflow.register_model(f"runs:/{run.info.run_id}/model", MODEL_NAME).version
        client.set_registered_model_alias(MODEL_NAME, "champion", version)

        port = _free_port()
        mlflow_bin = Path(venv_bin) / "mlflow"
        log = open(root / "server.log", "wb")
        proc = subprocess.Popen(
            [str(mlflow_bin), "models", "serve", "-m", f"models:/{MODEL_NAME}@champion",
             "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)],
            env=env, cwd=root, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 120
            while True:
                if proc.poll() is not None:
                    pytest.fail(f"mlflow models serve exited {proc.returncode}:\n"
                                + (root / "server.log").read_text()[-3000:])
                try:
                    if requests.get(f"{url}/ping", timeout=2).status_code == 200:
                        break
                except requests.ConnectionError:
                    pass
                if time.monotonic() > deadline:
                    pytest.fail("mlflow models serve did not answer /ping in 120 s:\n"
                                + (root / "server.log").read_text()[-3000:])
                time.sleep(0.5)
            yield url, model, proc
        finally:
            _stop(proc)
            log.close()


def _stop(proc: subprocess.Popen) -> None:
    """Stop the server and the uvicorn it started (one process group, started by this test)."""
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _post(url: str, payload: dict, timeout: float = 60):
    return requests.post(f"{url}/invocations", json=payload, timeout=timeout)


def _expected(model, patches: np.ndarray) -> np.ndarray:
    from mammodp.inference import predict_proba

    return predict_proba(model, patches.astype(np.float32))


def test_png_patch(served):
    url, model, _ = served
    rng = np.random.default_rng(0)
    patches = rng.uniform(0.1, 0.9, (3, PATCH, PATCH))
    r = _post(url, {"dataframe_records": [{"image": _png_b64(p)} for p in patches]})
    assert r.status_code == 200, r.text
    preds = r.json()["predictions"]
    assert [set(p) for p in preds] == [{"p_malignant", "label", "epsilon"}] * 3
    assert all(p["epsilon"] == "0.987" for p in preds)
    # What training would compute on the same stored patches (16-bit PNG round trip).
    stored = np.round(patches * 65535) / 65535
    np.testing.assert_allclose([p["p_malignant"] for p in preds], _expected(model, stored[:, None]), atol=1e-5)
    assert [p["label"] for p in preds] == [int(p["p_malignant"] >= 0.5) for p in preds]


def test_dicom_patch_and_full_mammogram_with_roi(served, tmp_path, make_dicom):
    from mammodp.data.dicom import read_dicom
    from mammodp.data.patches import crop_square, resize_patch

    url, model, _ = served
    rng = np.random.default_rng(1)
    patch = make_dicom(tmp_path / "patch.dcm", rng.integers(0, 4095, (PATCH, PATCH), dtype=np.uint16))
    full = make_dicom(tmp_path / "full.dcm", rng.integers(0, 4095, (160, 100), dtype=np.uint16))
    b64 = lambda p: base64.b64encode(p.read_bytes()).decode("ascii")  # noqa: E731
    r = _post(url, {"dataframe_records": [{"image": b64(patch)},
                                          {"image": b64(full), "roi": [30, 40, 70, 90]}]})
    assert r.status_code == 200, r.text
    expected = np.stack([resize_patch(read_dicom(patch), PATCH),
                         crop_square(read_dicom(full), (30, 40, 70, 90), margin=4, min_size=16, patch_size=PATCH)])
    np.testing.assert_allclose([p["p_malignant"] for p in r.json()["predictions"]],
                               _expected(model, expected[:, None]), atol=1e-5)


def test_tensor_of_patches(served):
    url, model, _ = served
    patches = np.random.default_rng(2).uniform(0, 1, (2, PATCH, PATCH))
    r = _post(url, {"dataframe_split": {"columns": ["pixels"], "data": [[p.tolist()] for p in patches]}})
    assert r.status_code == 200, r.text
    np.testing.assert_allclose([p["p_malignant"] for p in r.json()["predictions"]],
                               _expected(model, patches[:, None]), atol=1e-5)


@pytest.mark.parametrize(("payload", "message"), [
    ({"dataframe_records": [{"image": "%%% not base64 %%%"}]}, "not valid base64"),
    ({"dataframe_records": [{"image": base64.b64encode(b"GIF89a garbage").decode()}]}, "not a readable PNG"),
    ({"dataframe_records": [{"img": "abc"}]}, "needs an `image` column"),
    ({"dataframe_records": [{"pixels": [[[0.5] * 4] * 4] * 2}]}, "pixels"),
    ({"dataframe_records": [{"pixels": [[0.5, 1.5], [0.5, 0.5]]}]}, "values must lie in [0, 1]"),
    ({"dataframe_records": [{"image": "iVBORw0KGgo=", "roi": [5, 5, 1, 1]}]}, "x0 < x1"),
    ({"inputs": np.zeros((2, 1, 4, 4)).tolist()}, "2-d"),
    ({"not_a_format": []}, "dataframe_split"),
])
def test_malformed_requests_get_4xx_with_a_message(served, payload, message):
    url, _, _ = served
    r = _post(url, payload)
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:500])
    assert message in r.json()["message"], r.json()["message"][-500:]


def test_not_json_gets_4xx(served):
    url, _, _ = served
    r = requests.post(f"{url}/invocations", data=b"{not json", headers={"Content-Type": "application/json"},
                      timeout=30)
    assert 400 <= r.status_code < 500


def test_fifty_concurrent_requests(served):
    url, _, _ = served
    rng = np.random.default_rng(3)
    payloads = [{"dataframe_records": [{"image": _png_b64(rng.uniform(0, 1, (PATCH, PATCH)))}]} for _ in range(50)]
    with ThreadPoolExecutor(max_workers=50) as pool:
        responses = list(pool.map(lambda p: _post(url, p, timeout=120), payloads))
    assert [r.status_code for r in responses] == [200] * 50, [r.text[:200] for r in responses if r.status_code != 200]
    assert all(0.0 <= r.json()["predictions"][0]["p_malignant"] <= 1.0 for r in responses)


# --------------------------------------------------------------------------- limits and hostile payloads


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height 8-bit grey pixels (a decompression bomb's header)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\0" * (width + 1) * 16)  # a few rows; a real bomb compresses GBs like this
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def test_png_bomb_is_refused_naming_the_row_field_and_limit(served):
    url, _, _ = served
    r = _post(url, {"dataframe_records": [{"image": _png_b64(np.zeros((PATCH, PATCH)))},
                                          {"image": _b64(_png_header_only(20000, 20000))}]})
    assert 400 <= r.status_code < 500, r.text[:500]
    msg = r.json()["message"]
    assert "row 1: image:" in msg and "20000x20000" in msg and "serve.max_image_pixels" in msg, msg
    assert "unexpected error" not in msg


def test_dicom_over_the_pixel_limit_is_refused_from_its_header(served, tmp_path, make_dicom):
    from pydicom import dcmread

    url, _, _ = served
    path = make_dicom(tmp_path / "big.dcm", np.zeros((8, 8), np.uint16))
    ds = dcmread(path)
    ds.Rows, ds.Columns = 12000, 12000  # the header is what is checked: nothing is decoded
    ds.save_as(path)
    r = _post(url, {"dataframe_records": [{"image": _b64(path.read_bytes()), "roi": [10, 10, 50, 50]}]})
    assert 400 <= r.status_code < 500, r.text[:500]
    msg = r.json()["message"]
    assert "row 0: image:" in msg and "12000x12000" in msg and "serve.max_image_pixels" in msg, msg


def test_huge_roi_is_refused_naming_the_row_field_and_limit(served):
    url, _, _ = served
    r = _post(url, {"dataframe_records": [{"image": _png_b64(np.zeros((64, 64))), "roi": [0, 0, 2e9, 2e9]}]})
    assert 400 <= r.status_code < 500, r.text[:500]
    msg = r.json()["message"]
    assert "row 0: roi:" in msg and "serve.max_roi_side" in msg, msg


def test_too_many_rows_are_refused_naming_the_limit(served):
    url, _, _ = served
    rows = [{"pixels": np.full((4, 4), 0.5).tolist()}] * (LIMITS["max_rows"] + 1)
    r = _post(url, {"dataframe_records": rows})
    assert 400 <= r.status_code < 500, r.text[:500]
    assert "serve.max_rows" in r.json()["message"] and "17 rows" in r.json()["message"]


def test_wrong_column_name_lists_the_columns_and_says_others_are_dropped(served):
    url, _, _ = served
    r = _post(url, {"dataframe_records": [{"img": _png_b64(np.zeros((PATCH, PATCH)))}]})
    assert 400 <= r.status_code < 500, r.text[:500]
    msg = r.json()["message"]
    assert "image, roi, pixels" in msg and "dropped" in msg and "got columns: none" not in msg, msg


@pytest.mark.parametrize("extra", [{}, {"roi": [500, 500, 600, 600]}, {"roi": "{not json"}])
def test_error_replies_never_echo_the_payload(served, extra):
    url, _, _ = served
    payload = _b64(b"SECRET-PATIENT-BYTES " * 50)  # valid base64, not an image
    r = _post(url, {"dataframe_records": [{"image": payload, **extra}]})
    assert 400 <= r.status_code < 500, r.text[:500]
    assert payload[:16] not in r.text and "SECRET" not in r.text, r.text[:800]
    assert "row 0" in r.json()["message"]


@pytest.mark.parametrize("row", [{"pixels": "SECRET-PATIENT-TEXT " * 10},
                                 {"image": ["SECRET-PATIENT-TEXT " * 10]},
                                 {"image": 12345, "roi": "SECRET-PATIENT-TEXT"}])
def test_wrongly_typed_cells_never_echo_the_payload(served, row):
    """Cells of the wrong type get our 4xx, not MLflow's schema error (which repeats the data)."""
    url, _, _ = served
    r = _post(url, {"dataframe_records": [row]})
    assert 400 <= r.status_code < 500, r.text[:500]
    assert "SECRET" not in r.text and "12345" not in r.text, r.text[:800]
    assert "row 0" in r.json()["message"], r.json()["message"]


def _tree_memory_kib(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) in KiB summed over a process and all its descendants, read from /proc.

    VmHWM is each process's peak resident size since it started, so a request that allocates
    and frees gigabytes between two readings still shows in it.
    """
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    rss = hwm = 0
    todo = [pid]
    while todo:
        p = todo.pop()
        todo.extend(children.get(p, []))
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    rss += int(line.split()[1])
                elif line.startswith("VmHWM:"):
                    hwm += int(line.split()[1])
        except OSError:
            continue
    return rss, hwm


def _png_zeros(width: int, height: int) -> bytes:
    """A VALID all-black 8-bit PNG of width x height, compressed row by row (12000^2 -> ~140 KB)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    comp, row, parts = zlib.compressobj(9), b"\0" * (width + 1), []
    for _ in range(height):
        parts.append(comp.compress(row))
    parts.append(comp.flush())
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b"")


def test_server_memory_stays_bounded_and_flat_under_large_requests(served):
    """Requests at the limits, and small payloads far over them, leave the server's memory alone.

    Before the limits, the 140 KB 12000x12000 PNG alone raised the server's peak by ~1.35 GB.
    """
    url, _, proc = served
    side = 2000  # 4,000,000 pixels: exactly the model's limit
    rng = np.random.default_rng(5)
    big = _png_b64(rng.uniform(0, 1, (side, side)))
    pixels = rng.uniform(0, 1, (1000, 1000)).round(4).tolist()  # ~7 MB of JSON
    bomb = _b64(_png_zeros(12000, 12000))
    rss0, hwm0 = _tree_memory_kib(proc.pid)
    r = _post(url, {"dataframe_records": [{"image": bomb}]}, timeout=120)
    assert r.status_code == 400 and "serve.max_image_pixels" in r.json()["message"], r.text[:300]
    requests_ = [
        {"dataframe_records": [{"image": big, "roi": [100, 100, 1100, 1100]}]},
        {"dataframe_records": [{"image": bomb}]},
        {"dataframe_records": [{"image": big, "roi": [0, 0, 1024, 1024]}]},
        {"dataframe_records": [{"pixels": pixels}]},
    ]
    for payload in requests_ * 2:  # warm-up: allocator pools and caches reach their working size
        _post(url, payload, timeout=120)
    rss1, _ = _tree_memory_kib(proc.pid)
    rounds = []
    for _ in range(4):
        for payload in requests_:
            r = _post(url, payload, timeout=120)
            assert r.status_code in (200, 400), r.text[:300]
        rounds.append(_tree_memory_kib(proc.pid)[0])
    _, hwm = _tree_memory_kib(proc.pid)
    peak_mib, drift_mib = (hwm - hwm0) / 1024, (rounds[-1] - rounds[0]) / 1024
    print(f"\nserver tree: RSS {rss0 / 1024:.0f} MiB before, {rss1 / 1024:.0f} MiB after warm-up, "
          f"{' / '.join(f'{r / 1024:.0f}' for r in rounds)} MiB after each of 4 rounds of {len(requests_)} "
          f"requests (drift {drift_mib:+.0f} MiB); peak (VmHWM) +{peak_mib:.0f} MiB")
    assert peak_mib < 600, (hwm0, hwm)  # requests at the limit need ~200-300 MB; the bomb alone took 1.35 GB
    assert drift_mib < 64, rounds  # flat: repeated requests do not accumulate memory
