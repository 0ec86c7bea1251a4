"""``haqtune compare`` and ``haqtune ui`` (attached to the CLI group by ``cli.py``)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import click

from .errors import HaqtuneError, user_errors

DEFAULT_EXPERIMENT = "haqtune"
DEFAULT_COMPARE_DIR = "haqtune_compare"
UI_HOST = "127.0.0.1"  # never exposed beyond this machine; use a port-forward for remote access


@click.command("compare")
@click.option("--experiment", default=DEFAULT_EXPERIMENT, show_default=True, help="MLflow experiment name.")
@click.option("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db).")
@click.option("--output", default=DEFAULT_COMPARE_DIR, show_default=True,
              help="Directory for compare.csv and compare.png.")
@user_errors
def compare(experiment: str, tracking_uri: str | None, output: str) -> None:
    """Put the searches of an experiment side by side (best val_acc, costs, time to reach it)."""
    from .report import CONVERGED_FRACTION, compare_figure, compare_searches, format_compare
    from .tracking import load_searches, resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri)
    _, parents, children = load_searches(uri, experiment)
    if not parents:
        raise HaqtuneError(f"experiment {experiment!r} in {uri} has no haqtune searches yet")
    frame, curves = compare_searches(parents, children)
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    frame.to_csv(out / "compare.csv", index=False)
    (out / "compare.png").write_bytes(compare_figure(
        frame, curves, title=f"experiment {experiment}: best-so-far val_acc "
                             f"(dot: {CONVERGED_FRACTION:.0%} of the search's best reached)"))
    click.echo(format_compare(frame))
    click.echo(f"\nhaqtune: {len(frame)} searches; wrote {out / 'compare.csv'} and {out / 'compare.png'}")


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((UI_HOST, port))
        except OSError:
            return False
    return True


@click.command("ui")
@click.option("--port", type=click.IntRange(1, 65535), default=5000, show_default=True)
@click.option("--experiment", default=DEFAULT_EXPERIMENT, show_default=True, help="MLflow experiment name.")
@click.option("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db).")
@user_errors
def ui(port: int, experiment: str, tracking_uri: str | None) -> None:
    """Start the MLflow UI on 127.0.0.1 and print the experiment's runs-table URL."""
    from .tracking import experiment_url, find_experiment, resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri)
    experiment_id = find_experiment(uri, experiment)
    if uri.startswith(("http://", "https://")):
        # A tracking server already serves the UI.
        click.echo(f"haqtune: MLflow UI: {experiment_url(uri, experiment_id)}")
        return
    if not _port_free(port):
        raise HaqtuneError(f"port {port} on {UI_HOST} is in use: pass --port")
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri,
           "--host", UI_HOST, "--port", str(port), "--workers", "1"]
    # One user, one browser: a single worker starts in seconds, not a minute, and the
    # GenAI job runners (a pool of extra processes) have nothing to do for haqtune.
    env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **os.environ}
    proc = subprocess.Popen(cmd, env=env)
    click.echo(f"haqtune: MLflow UI: {experiment_url(f'http://{UI_HOST}:{port}', experiment_id)}  "
               "(Ctrl-C to stop)")
    try:
        code = proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        return
    if code:
        raise SystemExit(code)
