"""The ``sharedict`` command: run, inspect and stop the daemon.

``main(argv)`` returns the exit status, so tests call it directly: 0 for success, 1 for a
failure, 2 for a usage error.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import click

from sharedict.api import protocol
from sharedict.api.autostart import EXIT_ALREADY_RUNNING
from sharedict.api.config import Settings
from sharedict.api.errors import DaemonUnavailableError, Error
from sharedict.api.transport import Client, Request

STOP_TIMEOUT = 30.0


def _settings(socket_path: str | None, data_dir: str | None, **overrides: Any) -> Settings:
    settings = Settings.from_environ()
    changes = {key: value for key, value in overrides.items() if value is not None}
    if socket_path:
        changes["socket_path"] = os.path.abspath(socket_path)
    if data_dir:
        changes["data_dir"] = os.path.abspath(data_dir)
    return dataclasses.replace(settings, **changes)


def _daemon_client(socket_path: str | None) -> Client:
    """A client that never starts a daemon: inspecting one must not create one."""
    return Client(_settings(socket_path, None, autostart=False))


socket_option = click.option(
    "--socket", "socket_path", metavar="PATH", help="Unix socket of the daemon [env: SHAREDICT_SOCKET]."
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="sharedict")
def cli() -> None:
    """sharedict: named, persistent dicts shared by every process on this machine."""


@cli.command()
@socket_option
@click.option("--data-dir", metavar="PATH", help="Directory of the LMDB data [env: SHAREDICT_DATA_DIR].")
@click.option(
    "--expire-after",
    type=click.FloatRange(min=0),
    help="Seconds without activity after which an entry expires; 0 disables expiry "
    "[default: 604800, env: SHAREDICT_EXPIRE_AFTER].",
)
@click.option(
    "--sweep-interval",
    type=click.FloatRange(min=0, min_open=True),
    help="Seconds between sweeps of expired entries [default: 60, env: SHAREDICT_SWEEP_INTERVAL].",
)
@click.option(
    "--log-level",
    type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
    default="INFO",
    show_default=True,
    help="Lowest level of the log messages written to stderr.",
)
@click.option("--detach", is_flag=True, help="Run in the background; return once the daemon serves.")
def serve(
    socket_path: str | None,
    data_dir: str | None,
    expire_after: float | None,
    sweep_interval: float | None,
    log_level: str,
    detach: bool,
) -> None:
    """Run the daemon in the foreground, logging to stderr."""
    from sharedict.daemon import AlreadyRunning, Server, SetupError

    settings = _settings(socket_path, data_dir, expire_after=expire_after, sweep_interval=sweep_interval)
    logging.basicConfig(
        stream=sys.stderr,
        level=log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )

    report = None
    if detach:
        report = _detach()

    def ready() -> None:
        if report is not None:
            os.write(report, b"ready")
            os.close(report)

    try:
        Server(settings).run(on_ready=ready)
    except SetupError as exc:
        already_running = isinstance(exc, AlreadyRunning)
        if report is not None:
            os.write(report, (b"running:" if already_running else b"failed:") + str(exc).encode())
            os.close(report)
        click.echo(f"sharedict serve: {exc}", err=True)
        sys.exit(EXIT_ALREADY_RUNNING if already_running else 1)


def _detach() -> int:
    """Fork a daemon process; in the parent, wait for its start-up and exit with its outcome.

    Returns, in the daemon process, the pipe on which to report that it serves.
    """
    read_end, write_end = os.pipe()
    if os.fork() > 0:
        os.close(write_end)
        chunks = []
        while chunk := os.read(read_end, 65536):
            chunks.append(chunk)
        outcome = b"".join(chunks)
        if outcome == b"ready":
            os._exit(0)
        os._exit(EXIT_ALREADY_RUNNING if outcome.startswith(b"running:") else 1)

    os.close(read_end)
    os.setsid()
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.close(null)
    return write_end


def _status(socket_path: str | None) -> dict[str, Any]:
    client = _daemon_client(socket_path)
    try:
        return client.call(Request(protocol.STATUS))
    finally:
        client.close()


def _format_bytes(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


@cli.command()
@socket_option
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
def status(socket_path: str | None, as_json: bool) -> None:
    """Show whether the daemon runs, and its settings and contents."""
    info = _status(socket_path)
    if as_json:
        click.echo(json.dumps(info, indent=2, sort_keys=True))
        return
    last_sweep = info.get("last_sweep_at")
    rows = [
        ("pid", info["pid"]),
        ("version", info["version"]),
        ("uptime", f"{info['uptime']:.0f} s"),
        ("socket", info["socket_path"]),
        ("data dir", info["data_dir"]),
        ("disk usage", _format_bytes(info["data_bytes"])),
        ("disk free", _format_bytes(info["disk_free_bytes"])),
        ("dicts", info["dicts"]),
        ("entries", info["entries"]),
        ("connections", info["connections"]),
        ("expire after", f"{info['expire_after']:g} s" if info["expire_after"] else "never"),
        ("sweep interval", f"{info['sweep_interval']:g} s"),
        ("last sweep", time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(last_sweep)) if last_sweep else "not yet"),
        ("swept entries", info["swept_entries"]),
    ]
    width = max(len(label) for label, _ in rows)
    for label, value in rows:
        click.echo(f"{label:<{width}}  {value}")


@cli.command()
@socket_option
def stop(socket_path: str | None) -> None:
    """Stop the daemon gracefully, after the commits in flight."""
    client = _daemon_client(socket_path)
    try:
        pid = client.call(Request(protocol.STATUS))["pid"]
        client.call(Request(protocol.SHUTDOWN))
    finally:
        client.close()
    deadline = time.monotonic() + STOP_TIMEOUT
    while _process_exists(pid):
        if time.monotonic() > deadline:
            raise click.ClickException(f"the daemon (pid {pid}) did not stop within {STOP_TIMEOUT:.0f} s")
        time.sleep(0.02)
    click.echo(f"stopped the daemon (pid {pid})")


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with ``argv`` (default: ``sys.argv[1:]``); return the exit status."""
    try:
        cli.main(args=list(argv) if argv is not None else None, prog_name="sharedict", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("Aborted.", err=True)
        return 1
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except DaemonUnavailableError as exc:
        click.echo(f"sharedict: {exc}", err=True)
        return 1
    except Error as exc:
        click.echo(f"sharedict: {exc}", err=True)
        return 1
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 1
    return 0
