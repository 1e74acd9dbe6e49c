"""An MLflow artifact-repository plugin: the local store's artifacts at a project-relative path.

MLflow resolves a local artifact root to an absolute path (`file:///home/a/clone/mlruns/1`)
and writes it into every experiment, run and logged model of `mlflow.db`: a copied project
then logs into, and serves from, the original's folder. Experiments that `mammodp.tracking`
creates in a LOCAL store instead get `mammodp-project:mlruns/<experiment>`: a path relative to
the folder the commands run in (the repo root, where `mlflow.db` also lives, as DVC runs
every stage), resolved by this repository on every access. The store then holds no absolute
path, and a copy of the project (database and `mlruns/` together) works where it lands.

Registered for MLflow's own processes (`mlflow ui`, `mlflow models serve`) by the
`mlflow.artifact_repository` entry point in pyproject.toml, and in-process by
`mammodp.tracking` (so an editable install made before the entry point existed works too).
A shared tracking server never uses it: artifacts go through the server (`mlflow-artifacts:`).
"""

from __future__ import annotations

from pathlib import Path

from mlflow.store.artifact.local_artifact_repo import LocalArtifactRepository

SCHEME = "mammodp-project"


def to_local(artifact_uri: str) -> str:
    """`mammodp-project:mlruns/1/abc/artifacts` -> the absolute path under the current folder."""
    rel = artifact_uri.split(":", 1)[1].lstrip("/") if ":" in artifact_uri else artifact_uri
    return str(Path.cwd() / rel)


class ProjectArtifactRepository(LocalArtifactRepository):
    """`LocalArtifactRepository` at a path relative to the current folder."""

    def __init__(self, artifact_uri: str, tracking_uri: str | None = None, registry_uri: str | None = None):
        super().__init__(to_local(artifact_uri), tracking_uri, registry_uri)
        self.project_uri = artifact_uri


def register() -> None:
    """Register the scheme in this process (idempotent)."""
    from mlflow.store.artifact.artifact_repository_registry import _artifact_repository_registry

    _artifact_repository_registry.register(SCHEME, ProjectArtifactRepository)
