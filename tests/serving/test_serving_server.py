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
META = {"preset": "swin_micro", "mode": "full", "patch_size": PATCH, "margin": 4, "min_size": 16,
        "threshold": 0.5, "epsilon": 0.987, "epsilon_target": 1.0, "delta": 1e-4}


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
    from mammodp.serving import save_classifier

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
            yield url, model
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
    from mammodp.serving import predict_proba

    return predict_proba(model, patches.astype(np.float32))


def test_png_patch(served):
    url, model = served
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

    url, model = served
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
    url, model = served
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
    url, _ = served
    r = _post(url, payload)
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:500])
    assert message in r.json()["message"], r.json()["message"][-500:]


def test_not_json_gets_4xx(served):
    url, _ = served
    r = requests.post(f"{url}/invocations", data=b"{not json", headers={"Content-Type": "application/json"},
                      timeout=30)
    assert 400 <= r.status_code < 500


def test_fifty_concurrent_requests(served):
    url, _ = served
    rng = np.random.default_rng(3)
    payloads = [{"dataframe_records": [{"image": _png_b64(rng.uniform(0, 1, (PATCH, PATCH)))}]} for _ in range(50)]
    with ThreadPoolExecutor(max_workers=50) as pool:
        responses = list(pool.map(lambda p: _post(url, p, timeout=120), payloads))
    assert [r.status_code for r in responses] == [200] * 50, [r.text[:200] for r in responses if r.status_code != 200]
    assert all(0.0 <= r.json()["predictions"][0]["p_malignant"] <= 1.0 for r in responses)
