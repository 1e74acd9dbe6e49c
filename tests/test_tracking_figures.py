"""`tracking.log_figure`: a figure already saved as the DVC plot is logged as that very file."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import mlflow  # noqa: E402

from mammodp import tracking  # noqa: E402


def _figure():
    fig, ax = plt.subplots()
    ax.plot([0, 1], [0, 1])
    return fig


def test_saved_png_is_the_logged_artifact(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    # Process-wide in MLflow (restored after each test by conftest): this store, its own experiment.
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("figures")
    fig = _figure()
    saved = tmp_path / "plots" / "curve.png"
    saved.parent.mkdir()
    fig.savefig(saved, dpi=37)  # a dpi MLflow's own rendering would not choose
    other = tmp_path / "plots" / "other-name.png"
    fig.savefig(other, dpi=37)
    with mlflow.start_run() as run:
        tracking.log_figure(fig, "eval/curve.png", saved=saved)
        tracking.log_figure(fig, "top.png", saved=tmp_path / "missing.png")  # not saved: rendered
        tracking.log_figure(fig, "eval/renamed.png", saved=other)  # another name: rendered
    plt.close(fig)
    got = tmp_path / "got"
    mlflow.artifacts.download_artifacts(run_id=run.info.run_id, dst_path=str(got), tracking_uri=uri)
    assert (got / "eval" / "curve.png").read_bytes() == saved.read_bytes()
    assert (got / "top.png").is_file()
    assert (got / "eval" / "renamed.png").is_file()
    assert (got / "eval" / "renamed.png").read_bytes() != other.read_bytes()
    assert not (got / "eval" / "other-name.png").exists()
