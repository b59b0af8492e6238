"""The ``sharedict`` command: run, inspect and stop the daemon, and manage dicts from the shell.

``main(argv)`` returns the exit status, so tests call it directly: 0 for success, 1 for a
failure, 2 for a usage error. Errors are one line on stderr, without a traceback.

``status`` and ``stop`` never start a daemon: inspecting one must not create one. The
data commands are clients like any other and start one when none accepts connections,
unless ``SHAREDICT_AUTOSTART=0``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import importlib
import io
import json
import logging
import os
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any

import click

from sharedict.api import protocol
from sharedict.api.autostart import EXIT_ALREADY_RUNNING, LOG_NAME, open_daemon_log, process_running
from sharedict.api.cli_common import CommandError, print_rich
from sharedict.api.cli_format import format_bytes, format_duration, format_timestamp
from sharedict.api.config import EXPIRE_AFTER_VALUES, SWEEP_INTERVAL_VALUES, Settings, parse_seconds
from sharedict.api.errors import ConnectionLostError, DaemonUnavailableError, Error
from sharedict.api.transport import Client, Request

STOP_TIMEOUT = 30.0
# Seconds `status` and `stop` wait for the daemon's reply: a stopped daemon must not hang them.
STATUS_TIMEOUT = 10.0

# The data commands live in modules that import rich, which are loaded when one of their
# commands runs: `sharedict serve`, which every auto-start runs, stays quick to start.
_LAZY_COMMANDS = {
    "list": "sharedict.api.cli_commands:list_command",
    "create": "sharedict.api.cli_commands:create_command",
    "get": "sharedict.api.cli_commands:get_command",
    "put": "sharedict.api.cli_commands:put_command",
    "items": "sharedict.api.cli_commands:items_command",
    "clear": "sharedict.api.cli_commands:clear_command",
    "delete": "sharedict.api.cli_commands:delete_command",
    "export": "sharedict.api.cli_transfer:export_command",
    "import": "sharedict.api.cli_transfer:import_command",
}


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
    return Client(_settings(socket_path, None, autostart=False), request_timeout=STATUS_TIMEOUT)


socket_option = click.option(
    "--socket", "socket_path", metavar="PATH", help="Unix socket of the daemon [env: SHAREDICT_SOCKET]."
)


class _Seconds(click.ParamType):
    """A number of seconds, which accepts what the matching environment variable accepts."""

    name = "seconds"

    def __init__(self, *, zero_allowed: bool, values: str) -> None:
        self._zero_allowed = zero_allowed
        self._values = values

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        try:
            return parse_seconds(value, zero_allowed=self._zero_allowed)
        except ValueError:
            self.fail(f"{value!r} is invalid; pass {self._values}", param, ctx)


class _OutputClosed(Exception):
    """The reader of stdout went away, as ``head`` does after its lines."""


# Errors of a write that no command expects, since each command handles those of the
# files it opens: they come from writing to stdout.
_OUTPUT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO})


class _CommandGroup(click.Group):
    """The command group: loads the data commands on first use, and lists commands in a fixed order."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return [*self.commands, *_LAZY_COMMANDS]

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in _LAZY_COMMANDS:
            return super().get_command(ctx, cmd_name)
        module_name, attribute = _LAZY_COMMANDS[cmd_name].split(":")
        return getattr(importlib.import_module(module_name), attribute)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except BrokenPipeError:
            # click would catch the OSError itself and exit; as another type it reaches
            # main(), which also silences stdout.
            raise _OutputClosed from None


@click.group(cls=_CommandGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="sharedict")
def cli() -> None:
    """sharedict: named, persistent dicts shared by every process on this machine.

    Data commands start a daemon in the background when none runs, as any client does;
    set SHAREDICT_AUTOSTART=0 to make them fail instead.
    """


@cli.command()
@socket_option
@click.option("--data-dir", metavar="PATH", help="Directory of the LMDB data [env: SHAREDICT_DATA_DIR].")
@click.option(
    "--expire-after",
    type=_Seconds(zero_allowed=True, values=EXPIRE_AFTER_VALUES),
    help="Seconds without activity after which an entry expires; 0 disables expiry "
    "[default: 604800, env: SHAREDICT_EXPIRE_AFTER].",
)
@click.option(
    "--sweep-interval",
    type=_Seconds(zero_allowed=False, values=SWEEP_INTERVAL_VALUES),
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
    """Run the daemon in the foreground, logging to stderr.

    With --detach, the daemon logs to daemon.log in its data directory instead.
    """
    from sharedict.daemon import AlreadyRunning, Server, SetupError

    settings = _settings(socket_path, data_dir, expire_after=expire_after, sweep_interval=sweep_interval)
    report = _StartupReport(_detach(settings)) if detach else None

    try:
        if report is not None:
            _log_to_data_dir(settings)
        logging.basicConfig(
            stream=sys.stderr,
            level=log_level.upper(),
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        )
        Server(settings).run(on_ready=None if report is None else lambda: report.send(b"ready"))
    except SetupError as exc:
        already_running = isinstance(exc, AlreadyRunning)
        outcome = (b"running:" if already_running else b"failed:") + str(exc).encode()
        # The waiting process prints the error. If no process waits, stderr gets it.
        if report is None or not report.send(outcome):
            click.echo(f"Error: {exc}", err=True)
        sys.exit(EXIT_ALREADY_RUNNING if already_running else 1)
    except Exception as exc:
        # An unexpected failure, such as a full disk: the waiting process prints it, and
        # the traceback goes to the log.
        if report is not None:
            report.send(f"failed:{type(exc).__name__}: {exc}".encode())
        raise


def _detach(settings: Settings) -> int:
    """Fork a daemon process; in the parent, wait for its start-up and exit with its outcome.

    Returns, in the daemon process, the pipe on which to report that it serves.
    """
    # A caller may have closed stdin, stdout or stderr. The pipe must not take one of
    # their numbers, or the log would replace it later.
    for standard in (0, 1, 2):
        try:
            os.fstat(standard)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)  # the lowest free number, so this one
            if null != standard:
                os.dup2(null, standard)
                os.close(null)

    read_end, write_end = os.pipe()
    if os.fork() > 0:
        os.close(write_end)
        chunks = []
        while chunk := os.read(read_end, 65536):
            chunks.append(chunk)
        outcome = b"".join(chunks)
        if outcome == b"ready":
            os._exit(0)
        kind, _, message = outcome.partition(b":")
        if not message:
            log_path = os.path.join(settings.data_dir, LOG_NAME)
            message = f"the daemon exited during its start-up; see {log_path}".encode()
        click.echo(f"Error: {message.decode(errors='replace')}", err=True)
        os._exit(EXIT_ALREADY_RUNNING if kind == b"running" else 1)

    os.close(read_end)
    os.setsid()
    # Descriptors inherited from the caller, such as the write end of a pipe that the
    # caller reads to its end, would keep the caller waiting as long as the daemon runs.
    os.closerange(3, write_end)
    os.closerange(write_end + 1, os.sysconf("SC_OPEN_MAX"))
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.close(null)
    return write_end


def _log_to_data_dir(settings: Settings) -> None:
    """Point the detached daemon's stdout and stderr at its log, off the caller's terminal or pipe.

    A caller such as ``$(sharedict serve --detach)`` waits until every copy of its pipe
    closes, so a daemon that kept one would keep the caller waiting.
    """
    from sharedict.daemon import security

    log_path = os.path.join(settings.data_dir, LOG_NAME)
    try:
        security.prepare_private_dir(settings.data_dir, "data directory")
        log = open_daemon_log(settings.data_dir)
    except OSError as exc:
        raise security.SetupError(
            f"cannot open the daemon's log {log_path}: {exc.strerror}; check that its directory can be created "
            "and that the log is a regular file of yours"
        ) from None
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)

    # Python sets sys.stdout or sys.stderr to None when the caller had closed it.
    if sys.stdout is None:
        sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115 - lives as long as the process
    if sys.stderr is None:
        sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115 - lives as long as the process


class _StartupReport:
    """The pipe on which a detached daemon reports to the waiting ``serve --detach`` how its start went."""

    def __init__(self, fd: int) -> None:
        self._fd: int | None = fd

    def send(self, outcome: bytes) -> bool:
        """Send the outcome, once; return False if it was sent already or no process waits."""
        fd, self._fd = self._fd, None
        if fd is None:
            return False
        # The waiting process may have been killed, by Ctrl-C for example. The daemon
        # serves all the same, since clients started it for their use.
        try:
            os.write(fd, outcome)
        except BrokenPipeError:
            return False
        finally:
            os.close(fd)
        return True


@contextlib.contextmanager
def _running_daemon(socket_path: str | None, not_running: str) -> Iterator[Client]:
    """Yield a client of the running daemon; raise ``CommandError`` ending in ``not_running`` when none runs."""
    client = _daemon_client(socket_path)
    no_daemon = f"no sharedict daemon is running on {client.settings.socket_path}; {not_running}"
    try:
        if not client.daemon_is_up():
            raise CommandError(no_daemon)
        yield client
    except DaemonUnavailableError:
        if client.daemon_is_up():
            raise  # a daemon accepts connections but did not reply in time
        # The daemon stopped after the check. The client's own message would suggest
        # Settings(autostart=True), which means nothing on the command line.
        raise CommandError(no_daemon) from None
    finally:
        client.close()


def _status_rows(info: dict[str, Any]) -> list[tuple[str, Any]]:
    last_sweep = info.get("last_sweep_at")
    rows = [
        ("pid", info["pid"]),
        ("version", info["version"]),
        ("uptime", format_duration(info["uptime"])),
        ("socket", info["socket_path"]),
        ("data dir", info["data_dir"]),
        ("disk usage", format_bytes(info["data_bytes"])),
        ("disk free", format_bytes(info["disk_free_bytes"])),
        ("dicts", f"{info['dicts']:,}"),
        ("entries", f"{info['entries']:,}"),
        ("connections", info["connections"]),
        ("expire after", f"{info['expire_after']:g} s" if info["expire_after"] else "never"),
        ("sweep interval", f"{info['sweep_interval']:g} s"),
        ("last sweep", format_timestamp(last_sweep) if last_sweep else "not yet"),
        ("swept entries", f"{info['swept_entries']:,}"),
    ]
    if isinstance(info.get("locks"), list):
        rows.append(("held locks", len(info["locks"]) or "none"))
    return rows


def _print_locks(locks: list[dict[str, Any]]) -> None:
    """Print a table of the held locks, with a column for every field the daemon reports."""
    # Imported here so that `sharedict serve`, which every auto-start runs, starts without rich.
    from rich import box
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    fields: list[str] = []
    for lock in locks:
        fields.extend(field for field in lock if field not in fields)
    table = Table(
        *(field.replace("_", " ") for field in fields),
        box=box.SIMPLE_HEAD,
        show_edge=False,
        pad_edge=False,
    )
    for lock in locks:
        table.add_row(*(Text(_lock_field(field, lock.get(field))) for field in fields))
    print_rich(Console(highlight=False), table)


LONG_LEASE = 365 * 86400.0


def _lock_field(field: str, value: Any) -> str:
    if value is None:
        # A lock taken with lease=None has no lease, so nothing remains of one either.
        return "none" if field.startswith("lease") else ""
    if field.endswith("_at") and isinstance(value, (int, float)):
        return format_timestamp(value)
    if field.startswith("lease") and isinstance(value, (int, float)):
        # A lease may be any finite number of seconds. One of a year or more reads
        # better in scientific notation than in hundreds of digits.
        return f"{value:.1f} s" if value < LONG_LEASE else f"{value:.3g} s"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, bytes):
        return value.hex()
    return str(value)


@cli.command()
@socket_option
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
def status(socket_path: str | None, as_json: bool) -> None:
    """Show the daemon's state, contents and settings.

    Prints the pid, uptime, socket, data dir, disk usage, dict and entry counts, the
    expiry settings, the last sweep and the held locks. Never starts a daemon: with
    none running, this fails with exit status 1.
    """
    with _running_daemon(socket_path, "start one with `sharedict serve --detach`") as client:
        info = client.call(Request(protocol.STATUS))
    if as_json:
        click.echo(json.dumps(info, indent=2, sort_keys=True, default=repr))
        return

    rows = _status_rows(info)
    width = max(len(label) for label, _ in rows)
    for label, value in rows:
        click.echo(f"{label:<{width}}  {value}")
    if info.get("locks"):
        click.echo()
        _print_locks(info["locks"])


@cli.command()
@socket_option
def stop(socket_path: str | None) -> None:
    """Stop the daemon gracefully, after the commits in flight.

    Never starts a daemon: with none running, this fails with exit status 1.
    """
    with _running_daemon(socket_path, "there is nothing to stop") as client:
        pid = client.call(Request(protocol.STATUS))["pid"]
        try:
            client.call(Request(protocol.SHUTDOWN))
        except (ConnectionLostError, DaemonUnavailableError):
            # The daemon went away between the two requests, as when a SIGTERM stops it
            # at the same time, so wait for its pid as after a shutdown.
            pass
    deadline = time.monotonic() + STOP_TIMEOUT
    while process_running(pid):
        if time.monotonic() > deadline:
            raise CommandError(
                f"the daemon (pid {pid}) did not stop within {STOP_TIMEOUT:.0f} s; see its log, "
                f"or end it with `kill {pid}`"
            )
        time.sleep(0.02)
    click.echo(f"stopped the daemon (pid {pid})")


def _one_line(message: str) -> str:
    return " ".join(line.strip() for line in message.splitlines() if line.strip())


def _discard_stdout() -> None:
    """Point stdout at /dev/null, so that flushing it at exit raises no second error."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, ValueError, io.UnsupportedOperation):
        return  # not a real file, as under pytest's capture: nothing is flushed at exit
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with ``argv`` (default: ``sys.argv[1:]``); return the exit status."""
    # Python refuses to convert ints of over 4,300 digits to text, a guard for servers
    # that parse untrusted input. The commands print the user's own values, which may
    # hold such ints, and parse what the user typed.
    max_digits = sys.get_int_max_str_digits() if hasattr(sys, "get_int_max_str_digits") else None
    if max_digits is not None:  # Python 3.10.7 and later
        sys.set_int_max_str_digits(0)
    try:
        return _run(argv)
    finally:
        if max_digits is not None:
            sys.set_int_max_str_digits(max_digits)


def _run(argv: Sequence[str] | None) -> int:
    try:
        result = cli.main(args=list(argv) if argv is not None else None, prog_name="sharedict", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("Aborted.", err=True)
        return 1
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except _OutputClosed:
        # The process reading stdout has exited, so no error message could reach anyone.
        # SIGPIPE stays ignored, as Python sets it, because `serve` must never die of a
        # closed pipe.
        _discard_stdout()
        return 1
    except OSError as exc:
        if exc.errno not in _OUTPUT_ERRNOS:
            raise
        _discard_stdout()
        click.echo(f"Error: cannot write the output: {exc.strerror}", err=True)
        return 1
    except Error as exc:
        click.echo(f"Error: {_one_line(str(exc))}", err=True)
        return 1
    except SystemExit as exc:
        if exc.code is None:
            return 0
        return exc.code if isinstance(exc.code, int) else 1
    # A command returns None; click returns the exit code of --help and --version.
    return result if isinstance(result, int) else 0
