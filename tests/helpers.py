"""Helpers for tests that run daemons and clients in processes of their own.

The daemons started here use paths that the test chose, and every helper that waits
does so for a condition, with a deadline, never for a fixed time.
"""

from __future__ import annotations

import os
import resource
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable

START_TIMEOUT = 30.0
STOP_TIMEOUT = 30.0


def wait_until(condition: Callable[[], bool], timeout: float = START_TIMEOUT, interval: float = 0.005) -> bool:
    """Poll ``condition`` until it is true; return False if ``timeout`` seconds pass first."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True


def socket_accepts(socket_path: str) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(socket_path)
        return True
    except OSError:
        return False
    finally:
        probe.close()


def serve_command(socket_path: str, data_dir: str, *extra_args: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "sharedict",
        "serve",
        "--socket",
        socket_path,
        "--data-dir",
        data_dir,
        *extra_args,
    ]


def run_serve(socket_path: str, data_dir: str, *extra_args: str) -> subprocess.CompletedProcess[str]:
    """Run ``sharedict serve`` to its end: for daemons that are expected to refuse to start."""
    return subprocess.run(
        serve_command(socket_path, data_dir, *extra_args),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=START_TIMEOUT,
        check=False,
    )


def read_log(log_path: str) -> str:
    """Return a daemon's log, or "(no log)" before the daemon wrote one."""
    try:
        with open(log_path, errors="replace") as log:
            return log.read()
    except FileNotFoundError:
        return "(no log)"


def launch_daemon(
    command: list[str],
    socket_path: str,
    log_path: str,
    *,
    env: dict[str, str] | None = None,
    preexec_fn: Callable[[], None] | None = None,
) -> subprocess.Popen[bytes]:
    """Run a daemon's ``command`` and return once it accepts connections.

    The daemon's output is appended to ``log_path``. A daemon that fails to start
    raises RuntimeError with the log in its message, so that CI output shows why.
    """
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env, preexec_fn=preexec_fn
        )
    if not wait_until(lambda: socket_accepts(socket_path) or process.poll() is not None):
        process.kill()
        process.wait()
        raise RuntimeError(f"the daemon did not accept connections within {START_TIMEOUT} s:\n{read_log(log_path)}")
    if process.poll() is not None:
        raise RuntimeError(f"the daemon exited with status {process.returncode}:\n{read_log(log_path)}")
    return process


def start_serve(
    socket_path: str, data_dir: str, log_path: str, *extra_args: str, max_open_files: int | None = None
) -> subprocess.Popen[bytes]:
    """Start ``sharedict serve`` and return once it accepts connections.

    ``max_open_files`` lowers the daemon's limit of file descriptors.
    """

    def limit_open_files() -> None:
        if max_open_files is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (max_open_files, max_open_files))

    command = serve_command(socket_path, data_dir, "--log-level", "DEBUG", *extra_args)
    return launch_daemon(command, socket_path, log_path, preexec_fn=limit_open_files)


def stop_process(process: subprocess.Popen[bytes]) -> None:
    """Stop a daemon of the test with SIGTERM, and with SIGKILL if it hangs."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _command_line(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as file:
            return [part.decode(errors="replace") for part in file.read().split(b"\0") if part]
    except OSError:
        return []


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as file:
            # The state follows the command name, which is in parentheses and may
            # itself contain spaces or parentheses.
            return file.read().rsplit(b")", 1)[1].split()[0] == b"Z"
    except (OSError, IndexError):
        return True


def daemon_pids(data_dir: str) -> list[int]:
    """Return the pids of the live ``sharedict serve`` processes whose command line names ``data_dir``."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        command = _command_line(pid)
        if "serve" in command and data_dir in command and not _is_zombie(pid):
            pids.append(pid)
    return pids


def process_is_gone(pid: int) -> bool:
    """Return whether ``pid`` has exited; a zombie that nobody reaped counts as gone."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return _is_zombie(pid)


def kill_pid(pid: int) -> None:
    """Stop a daemon that is not a child of the test, such as an auto-started one."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    if not wait_until(lambda: process_is_gone(pid), timeout=STOP_TIMEOUT):
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: process_is_gone(pid), timeout=STOP_TIMEOUT)


def wait_for_child(pid: int, timeout: float) -> int:
    """Return the exit code of a forked child; kill it if it hangs, as a deadlock would."""
    deadline = time.monotonic() + timeout
    while True:
        finished, wait_status = os.waitpid(pid, os.WNOHANG)
        if finished:
            return os.waitstatus_to_exitcode(wait_status)
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise AssertionError(f"the forked child {pid} hung for {timeout:g} s")
        time.sleep(0.02)
