"""`transferkit ui`: the MLflow dashboard on the local tracking store, for reviewing and comparing runs."""

from __future__ import annotations

import os
import signal
import socket
import subprocess

import click

from transferkit import params
from transferkit.cli.group import main
from transferkit.errors import TransferkitError

LOOPBACK = ("127.0.0.1", "localhost", "::1")
MAX_LINKS = 5  # experiments listed with their "best first" link, most recently active first


@main.command("ui")
@click.option("--port", type=params.PORT.click_type(), default=5000, show_default=True, help="Port (0: any free port).")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind. Anything but loopback exposes an unauthenticated server to the network.")
@click.option("--backend-store-uri", default=None, metavar="URI",
              help="Tracking store to show [default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db here].")
def ui(port, host, backend_store_uri):
    """Start the MLflow UI on the tracking store and print its URL and, per experiment, the link to its runs
    table with the headline metrics shown and the best run first (Ctrl-C stops it)."""
    from transferkit.tracking.lookup import best_first_links
    from transferkit.tracking.store import dashboard_command, redact, resolve_tracking_uri

    store = resolve_tracking_uri(backend_store_uri)
    dashboard_command(store)  # refuses a store that is already a server before any port is taken
    port = _free_port(host, port)
    command, env = dashboard_command(store, host=host, port=port)
    if host not in LOOPBACK:
        click.echo(f"warning: binding {host}: anyone who can reach this machine can read and delete runs", err=True)
    url = f"http://{'localhost' if host == '::1' else host}:{port}"
    click.echo(f"MLflow UI for {redact(store)} at {url}  (Ctrl-C to stop)")
    for name, link in best_first_links(store, url, MAX_LINKS):
        click.echo(f"  {name}: {link}")
    # Own process group, so Ctrl-C or a SIGTERM to this command stops mlflow and its uvicorn workers together.
    server = subprocess.Popen(command, env=env, start_new_session=True)
    signal.signal(signal.SIGTERM, lambda *_: os.killpg(server.pid, signal.SIGTERM))
    try:
        code = server.wait()
    except KeyboardInterrupt:
        os.killpg(server.pid, signal.SIGTERM)
        code = server.wait()
    if code not in (0, -signal.SIGINT, -signal.SIGTERM):
        raise TransferkitError(f"mlflow server exited with code {code}; see its output above", exit_code=1)


def _free_port(host: str, port: int) -> int:
    """``port`` once it is known to be free on ``host``; 0 picks a free one (the mlflow server binds it a moment
    later: another program could take it in between, which the server would then report)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise TransferkitError(f"cannot listen on {host}:{port} ({exc.strerror}); pass another --port "
                                   "(0: any free port)") from exc
        return sock.getsockname()[1]
