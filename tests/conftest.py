"""Shared test fixtures (kept minimal): a writer of tiny DICOM files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest


def write_dicom(
    path: str | Path,
    pixels: np.ndarray,
    *,
    photometric: str = "MONOCHROME2",
    study_uid: str | None = None,
    series_uid: str | None = None,
    **tags,
) -> Path:
    """Write a single-frame greyscale DICOM (uncompressed) with optional extra tags.

    `pixels` is uint8 or uint16 (int16 for signed data); extra keyword tags are set on the
    dataset as-is (e.g. RescaleSlope=2, WindowCenter=100).
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    arr = np.ascontiguousarray(pixels)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.Modality = "MG"
    bits = 8 if arr.dtype.itemsize == 1 else 16
    ds.set_pixel_data(arr, photometric_interpretation="MONOCHROME2", bits_stored=bits)
    ds.PhotometricInterpretation = photometric
    for key, value in tags.items():
        setattr(ds, key, value)
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(p, enforce_file_format=True)
    return p


@pytest.fixture
def make_dicom():
    """The `write_dicom` function, as a fixture."""
    return write_dicom


@pytest.fixture(scope="session", autouse=True)
def _private_mlflow_store(tmp_path_factory):
    """Never let a test write runs into the repo's own MLflow store: default to a temp one.

    Tests that need their own store still set MLFLOW_TRACKING_URI with monkeypatch.
    """
    import os

    old = os.environ.get("MLFLOW_TRACKING_URI")
    root = tmp_path_factory.mktemp("mlflow-store")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root}/mlflow.db"
    yield
    if old is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = old


@pytest.fixture(autouse=True)
def _mlflow_global_uri_restored():
    """Undo a test's `mlflow.set_tracking_uri`: MLflow keeps it process-wide (it also rewrites
    MLFLOW_TRACKING_URI), so one test's store would otherwise receive every later test's runs."""
    import os

    try:
        from mlflow.tracking._tracking_service import utils
    except ModuleNotFoundError as exc:  # the GPU machine's training-core tests run without MLflow
        if exc.name != "mlflow":
            raise  # MLflow is there but moved its module: restoring must not silently stop
        yield
        return

    env, glob = os.environ.get("MLFLOW_TRACKING_URI"), utils._tracking_uri
    yield
    utils._tracking_uri = glob
    if env is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = env


def _runs_in(tracking_uri: str, experiment: str, filter_string: str = "") -> list:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    return list(client.search_runs([exp.experiment_id], filter_string=filter_string, max_results=10_000))


@pytest.fixture(scope="session")
def runs_in():
    """`runs_in(tracking_uri, experiment, filter_string="")`: runs of one experiment in the store
    at `tracking_uri`, read without touching MLflow's process-wide tracking URI."""
    return _runs_in


@pytest.fixture(scope="session")
def make_tiny_project(tmp_path_factory):
    """Factory: a project folder with a tiny prepared CBIS-style phantom (32 px patches).

    `make_tiny_project(name, train={...}, dp={...}, ...)` updates those params sections of
    the repo's params.yaml and writes them into the folder. Data paths stay relative
    (`data/prepared`), so commands run from inside the folder, as DVC runs them.
    """
    import yaml

    from mammodp.config import load_config
    from mammodp.stages import phantom, prepare

    repo = Path(__file__).resolve().parents[1]

    def make(name: str, **sections) -> Path:
        root = tmp_path_factory.mktemp(name)
        p = yaml.safe_load((repo / "params.yaml").read_text())
        p["model"].update(pretrained_weights=None, mode="full")  # no pretrain stage here: random init, all trained
        p["phantom"].update(cbis_train_patients=24, cbis_test_patients=4, bcdr_patients=4, image_height=256,
                            image_width=160, mass_radius=[7.0, 14.0], difficulty=0.0)
        p["prepare"].update(patch_size=32, margin=8, min_size=24, workers=1)
        for key, value in sections.items():
            if isinstance(value, dict):
                p[key].update(value)
            else:
                p[key] = value
        (root / "params.yaml").write_text(yaml.safe_dump(p))
        cfg = load_config(root / "params.yaml")
        phantom.run(cfg, out=root / "data/raw")
        prepare.run(cfg, source="cbis-ddsm", root=root / "data/raw/cbis-ddsm", out=root / "data/prepared/cbis")
        return root

    return make
