"""`mammodp`: one thin command per pipeline stage.

Each command parses its options, loads params.yaml into typed config and calls one stage
function. A `MammoDPError` becomes one line on stderr and exit code 1; anything else is a
bug and keeps its traceback. Stage modules are imported inside the commands so that
`mammodp --help` stays fast and light.
"""

from __future__ import annotations

import functools
import logging
import sys
from pathlib import Path
from typing import Callable, Optional

import typer

from mammodp.errors import Interrupted, MammoDPError

app = typer.Typer(
    help="Privacy-preserving mammography classifiers: one command per DVC stage.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

ParamsOpt = typer.Option(Path("params.yaml"), "--params", "-p", help="params.yaml to read.")


def _user_errors(fn: Callable) -> Callable:
    """Turn a MammoDPError into one clear line and exit code 1 (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        try:
            return fn(*args, **kwargs)
        except MammoDPError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(1) from None
        except Interrupted as exc:  # SIGTERM/SIGHUP: outputs were unwound like Ctrl-C's
            typer.echo(f"error: {exc}; temporary outputs removed, MLflow run marked KILLED", err=True)
            raise typer.Exit(128 + exc.signum) from None

    return wrapper


def _cfg(params: Path):
    from mammodp.config import load_config

    return load_config(params)


@app.command()
@_user_errors
def phantom(
    out: Path = typer.Option(Path("data/raw"), help="Folder to write the phantom raw data into."),
    if_missing: bool = typer.Option(False, help="Do nothing if OUT already holds data."),
    public: bool = typer.Option(False, help="Write the public pretraining set (pretrain.*) instead."),
    params: Path = ParamsOpt,
):
    """Write the built-in phantom data set (CBIS-DDSM and BCDR layouts) to OUT."""
    from mammodp.stages import phantom as stage

    if public:
        stage.run_public(_cfg(params), out=out)
    else:
        stage.run(_cfg(params), out=out, if_missing=if_missing)


@app.command()
@_user_errors
def prepare(
    source: str = typer.Option(..., help="cbis-ddsm or bcdr."),
    root: Path = typer.Option(..., help="Folder with the source's CSVs and images (searched recursively)."),
    out: Path = typer.Option(..., help="Output folder: patches + manifest.parquet/.csv."),
    params: Path = ParamsOpt,
):
    """Import a raw data set into lossless patches and a patient-disjoint manifest."""
    from mammodp.stages import prepare as stage

    stage.run(_cfg(params), source=source, root=root, out=out)


@app.command()
@_user_errors
def validate(
    manifest: list[Path] = typer.Option(
        None, help="Manifests to check (default: every prepared manifest)."
    ),
    report_dir: Path = typer.Option(Path("reports/validation"), help="Where JSON reports go."),
    params: Path = ParamsOpt,
):
    """Run the Great Expectations suite over the manifests; exit 1 on any failure."""
    from mammodp.stages import validate as stage

    stage.run(_cfg(params), manifests=manifest or None, report_dir=report_dir)


@app.command("train-gan")
@_user_errors
def train_gan(
    out: Path = typer.Option(Path("models/mcgan"), help="Checkpoint and sample folder."),
    resume: bool = typer.Option(False, help="Continue from OUT's last checkpoint."),
    device: Optional[str] = typer.Option(None, help="Override gan.device (cpu, cuda)."),
    params: Path = ParamsOpt,
):
    """Train the malignancy-conditioned GAN (optionally with a DP discriminator)."""
    from mammodp.stages import train_gan as stage

    stage.run(_cfg(params), out=out, resume=resume, device=device)


@app.command()
@_user_errors
def synthesize(
    generator: Path = typer.Option(Path("models/mcgan"), help="Folder of the trained generator."),
    out: Path = typer.Option(Path("data/synthetic"), help="Where PNGs and manifest go."),
    params: Path = ParamsOpt,
):
    """Write a synthetic set (N per class) with a manifest recording its provenance."""
    from mammodp.stages import synthesize as stage

    stage.run(_cfg(params), generator=generator, out=out)


@app.command("synth-quality")
@_user_errors
def synth_quality(
    out: Path = typer.Option(Path("metrics/synthesis.json"), help="Numbers-only metrics JSON."),
    report: Path = typer.Option(Path("reports/synthesis.json"), help="The whole table, with skip reasons."),
    plots: Path = typer.Option(Path("plots/synthesis"), help="Folder for the closest-pairs grid."),
    params: Path = ParamsOpt,
):
    """FID, FRD and memorisation of the synthetic set against real data."""
    from mammodp.stages import synth_quality as stage

    stage.run(_cfg(params), out=out, plots=plots, report=report)


@app.command()
@_user_errors
def train(
    regime: str = typer.Option(..., help="real | real+synth | synth | synth-pretrain+dp-finetune"),
    epsilon: Optional[str] = typer.Option(None, help="Target budget, or inf for non-private (not for synth: "
                                                     "one model for every budget)."),
    seed: Optional[list[int]] = typer.Option(None, help="Seeds to run (default: train.seeds)."),
    synth_model: Path = typer.Option(Path("models/classifier/synth"),
                                     help="The synth model that synth-pretrain+dp-finetune fine-tunes (seed=S/ inside)."),
    resume: bool = typer.Option(False, help="Resume from OUT's last epoch checkpoint; refuse one made with other settings."),
    resume_if_valid: bool = typer.Option(False, help="Resume from a checkpoint of identical settings, else train afresh (the pipeline's choice)."),
    device: Optional[str] = typer.Option(None, help="Override train.device."),
    out: Optional[Path] = typer.Option(None, help="Model folder (default models/classifier/REGIME-EPS; synth: models/classifier/synth)."),
    metrics: Optional[Path] = typer.Option(None, help="Numbers-only metrics JSON (default metrics/train/REGIME-EPS.json)."),
    report: Optional[Path] = typer.Option(None, help="Full record JSON (default reports/train/REGIME-EPS.json)."),
    tuned: Optional[Path] = typer.Option(None, help="Train with the best params of a tuning report "
                                                     "(reports/tune/eps=E.json)."),
    params: Path = ParamsOpt,
):
    """Train the Swin classifier for one (regime, epsilon) over the seeds."""
    from mammodp.config import parse_epsilon
    from mammodp.stages import train as stage

    stage.run(
        _cfg(params),
        regime=regime,
        epsilon=None if epsilon is None else parse_epsilon(epsilon),
        seeds=seed or None,
        synth_model=synth_model,
        resume=resume,
        device=device,
        out=out,
        metrics_out=metrics,
        report_out=report,
        tuned_path=tuned,
        resume_if_valid=resume_if_valid,
    )


@app.command()
@_user_errors
def features(
    out: Path = typer.Option(Path("data/features"), help="Folder of feature tables (<set>.parquet)."),
    metrics: Path = typer.Option(Path("metrics/features.json"), help="Numbers-only metrics JSON."),
    public: Path = typer.Option(Path("data/public"), help="The public set (`mammodp phantom --public` output)."),
    params: Path = ParamsOpt,
):
    """Radiomics features of every prepared patch, once (input of the radiomics-linear baseline)."""
    from mammodp.stages import features as stage

    stage.run(_cfg(params), out=out, metrics_out=metrics, public=public)


@app.command("train-baseline")
@_user_errors
def train_baseline(
    epsilon: str = typer.Option(..., help="Target budget, or inf for non-private."),
    seed: Optional[list[int]] = typer.Option(None, help="Seeds to run (default: train.seeds)."),
    features: Path = typer.Option(Path("data/features"), help="Feature tables of `mammodp features`."),
    out: Optional[Path] = typer.Option(None, help="Model folder (default models/baseline/radiomics-linear-EPS)."),
    metrics: Optional[Path] = typer.Option(None, help="Numbers-only metrics JSON."),
    report: Optional[Path] = typer.Option(None, help="Full record JSON."),
    params: Path = ParamsOpt,
):
    """Train the radiomics-linear baseline (logistic regression; DP-SGD when EPSILON is finite)."""
    from mammodp.config import parse_epsilon
    from mammodp.stages import train_baseline as stage

    stage.run(_cfg(params), epsilon=parse_epsilon(epsilon), seeds=seed or None, out=out, metrics_out=metrics,
              report_out=report, features=features)


@app.command()
@_user_errors
def pretrain(
    data: Path = typer.Option(Path("data/public"), help="The public set (`mammodp phantom --public` output)."),
    out: Path = typer.Option(Path("models/pretrain"), help="Weights folder (model.pt, meta.json)."),
    metrics: Path = typer.Option(Path("metrics/pretrain.json"), help="Numbers-only metrics JSON."),
    report: Path = typer.Option(Path("reports/pretrain.json"), help="Full record JSON."),
    device: Optional[str] = typer.Option(None, help="Override train.device."),
    params: Path = ParamsOpt,
):
    """Train the Swin on the public set without DP: the weights every regime starts from."""
    from mammodp.stages import pretrain as stage

    stage.run(_cfg(params), data=data, out=out, metrics_out=metrics, report_out=report, device=device)


@app.command()
@_user_errors
def evaluate(
    models: Path = typer.Option(Path("models/classifier"), help="Folder of trained grid cells."),
    out: Path = typer.Option(Path("metrics/eval"), help="Numbers-only metrics folder ({internal,external}/REGIME.json)."),
    plots: Path = typer.Option(Path("plots/eval"), help="Plots folder."),
    report: Path = typer.Option(Path("reports/eval"), help="Report folder (summary.json, runs/ with fairness)."),
    baselines: Path = typer.Option(Path("models/baseline"), help="Folder of radiomics-linear cells."),
    features: Path = typer.Option(Path("data/features"), help="Feature tables of `mammodp features`."),
    params: Path = ParamsOpt,
):
    """Evaluate every trained run internally and externally; fairness and privacy-utility plots."""
    from mammodp.stages import evaluate as stage

    stage.run(_cfg(params), models=models, out=out, plots=plots, report=report, baselines=baselines,
              features=features)


@app.command()
@_user_errors
def tune(
    epsilon: str = typer.Option(..., help="Privacy budget to tune for."),
    out: Optional[Path] = typer.Option(None, help="Numbers-only result (default metrics/tune/eps=E.json)."),
    report: Optional[Path] = typer.Option(None, help="Full result with best params and privacy statement "
                                                      "(default reports/tune/eps=E.json)."),
    params: Path = ParamsOpt,
):
    """Optuna study of clipping norm, noise and learning rate for one budget."""
    from mammodp.config import parse_epsilon
    from mammodp.stages import tune as stage

    stage.run(_cfg(params), epsilon=parse_epsilon(epsilon), out=out, report=report)


@app.command()
@_user_errors
def promote(
    out: Path = typer.Option(Path("metrics/promote.json"), help="Numbers of what was promoted (DVC metric)."),
    report: Path = typer.Option(Path("reports/promote.json"), help="Full record: aliases, why, what epsilon covers."),
    models: Path = typer.Option(Path("models/classifier"), help="Only the runs of the classifiers saved here compete "
                                                                "(the pipeline's current models)."),
    all_runs: bool = typer.Option(False, "--all-runs", help="Every finished train run of the experiment competes, "
                                                            "also those of earlier code, data or params."),
    params: Path = ParamsOpt,
):
    """Register the best covered validation run per budget and set registry aliases."""
    from mammodp.stages import promote as stage

    stage.run(_cfg(params), out=out, report=report, models=None if all_runs else models)


@app.command()
@_user_errors
def audit(
    models: Path = typer.Option(Path("models/classifier"), help="Folder of trained grid cells."),
    promoted: Path = typer.Option(Path("reports/promote.json"), help="Promotion record (from `mammodp promote`)."),
    out: Path = typer.Option(Path("metrics/audit.json"), help="Numbers (DVC metric)."),
    report: Path = typer.Option(Path("reports/audit.json"), help="Full audit report."),
    plots: Path = typer.Option(Path("plots/audit"), help="Folder for the claim-vs-bound plot."),
    device: Optional[str] = typer.Option(None, help="Override train.device for the audit models."),
    params: Path = ParamsOpt,
):
    """Empirical privacy audit: membership inference and a one-run epsilon lower bound (fails if above the claim)."""
    from mammodp.stages import audit as stage

    stage.run(_cfg(params), models=models, promoted=promoted, out=out, report=report, plots=plots, device=device)


@app.command()
@_user_errors
def server(
    root: Path = typer.Option(Path(".mlflow-server"), help="Folder for the PostgreSQL cluster, logs and artifacts."),
    host: str = typer.Option("127.0.0.1", help="Interface the MLflow server listens on (0.0.0.0: other machines)."),
    port: int = typer.Option(5000, help="MLflow server port."),
    pg_port: int = typer.Option(5432, help="Port of the local PostgreSQL cluster (127.0.0.1 only)."),
    backend_store_uri: Optional[str] = typer.Option(None, help="Use this database instead of a local cluster "
                                                                "(postgresql://USER:PASS@HOST:PORT/DB)."),
    artifacts_destination: Optional[str] = typer.Option(None, help="Artifact folder or object-store URI "
                                                                    "(default ROOT/artifacts)."),
):
    """Run the shared tracking server (PostgreSQL backend, proxied artifacts) until Ctrl-C."""
    import signal
    import time

    from mammodp.server import tracking_server

    def stop(signum, frame):  # noqa: ARG001 - `kill`, `timeout` and service managers send SIGTERM
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)

    with tracking_server(root, host=host, port=port, pg_port=pg_port, backend_store_uri=backend_store_uri,
                         artifacts_destination=artifacts_destination) as uris:
        typer.echo(f"MLflow server: export MLFLOW_TRACKING_URI={uris['tracking_uri']}")
        if uris["optuna_storage"]:
            typer.echo(f"Optuna storage for this machine's workers: tune.storage: {uris['optuna_storage']}")
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            typer.echo("stopping")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def preload(
    ctx: typer.Context,
    log: Optional[Path] = typer.Option(None, help="Append the server's log (one line per command served) here."),
):
    """Run a command (e.g. `dvc repro`) with torch, timm and MLflow preloaded for every `mammodp` it starts.

    Usage: mammodp preload -- dvc repro [ARGS]. Each `mammodp` stage then runs in a fork of
    one process that imported those libraries once (seconds saved per stage); one whose
    environment differs from the server's runs on its own. MAMMODP_PRELOAD=0 turns it off.
    """
    from mammodp.preload import run_with_server

    if not ctx.args:
        typer.echo("error: no command given (usage: mammodp preload -- dvc repro)", err=True)
        raise typer.Exit(2)
    try:
        rc = run_with_server(list(ctx.args), log_path=str(log) if log else None)
    except FileNotFoundError as exc:
        typer.echo(f"error: cannot run {ctx.args[0]!r}: {exc.strerror}", err=True)
        raise typer.Exit(127) from None
    except PermissionError as exc:
        typer.echo(f"error: cannot run {ctx.args[0]!r}: {exc.strerror}", err=True)
        raise typer.Exit(126) from None
    raise typer.Exit(rc)


@app.command()
@_user_errors
def collect(
    repo: Path = typer.Option(Path("."), help="The repo whose queued experiments to collect."),
    refs: Optional[str] = typer.Option(None, help="Collect from these git refs instead (a for-each-ref pattern, "
                                                  "e.g. 'refs/remotes/origin/grid/*' pushed by other machines)."),
    checkout: bool = typer.Option(True, help="dvc checkout the collected stages (--no-checkout: then dvc pull)."),
):
    """Bring the grid cells that `dvc queue` ran into the workspace (dvc.lock entries + outputs)."""
    from mammodp.grid import collect_experiments

    got = collect_experiments(repo, checkout=checkout, refs=refs)
    for stage, exp in sorted(got.items()):
        typer.echo(f"{stage} <- experiment {exp}")
    if not got:
        typer.echo("no finished experiment of this commit ran a stage")


@app.command("lint-params")
def lint_params(
    files: list[Path] = typer.Argument(..., help="params files to check (params.yaml, pipelines/*.yaml)."),
):
    """Load each params file strictly (every key present, known, well typed, in range)."""
    from mammodp.config import check_params_files

    lines = check_params_files(files)
    typer.echo("\n".join(lines))
    if any(line.startswith("error") for line in lines):
        raise typer.Exit(1)


def main() -> None:  # pragma: no cover - console entry point alternative
    app(prog_name="mammodp")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
