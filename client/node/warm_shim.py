"""The ``flwr-clientapp`` stand-in of the warm launcher (see :mod:`warm_launcher` for why).

``warm_launcher.write_shim`` copies this file, with ``SOCKET_PATH`` and ``TARGET`` filled
in, as an executable named ``flwr-clientapp`` into a folder first on the SuperNode's PATH,
so Flower's SuperExec starts it instead of the real program, once per message. It runs as
``python -IS`` (no ``site``, no environment-driven start-up) and imports only the standard
library modules below: its own start-up costs ~0.1 s, against seconds for Flower's.

It hands its argv, environment, working directory and stdin/stdout/stderr (as file
descriptors, SCM_RIGHTS) to the device's fork server, which forks a ClientApp process that
takes them over. The shim then stands in for that process: it forwards the signals it gets
and exits with the child's status. When the fork server is absent or refuses, it ``execv``s
the real program instead, so a message never depends on the warm path.

Wire protocol (Unix stream socket), version ``PROTOCOL``:

1. shim → server: a 4-byte big-endian length, then that many bytes of JSON
   ``{"protocol", "target", "argv", "env", "cwd", "fds"}`` (``fds``: which of 0, 1, 2 it
   will send, in order).
2. server → shim, one JSON object per line: ``{"refused": reason}`` (run cold) or
   ``{"ready": true}``; then shim → server: ``FDS_MARKER`` with the descriptors attached.
   Descriptors go only to a server that answered: in flight to a wedged one, they would
   keep the shim's pipes open after it fell back.
3. server → shim: ``{"pid": n}`` (the child runs) or ``{"refused": reason}``, later
   ``{"exit": code}`` or ``{"killed": signum}``.
4. shim → server, one JSON object per line: ``{"signal": signum}`` to forward. Closing the
   connection before the child's status arrived makes the server kill the child.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import socket
import struct
import sys

PROTOCOL = 1
#: Signals a process manager may send the ClientApp; the shim passes them on.
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT,
             signal.SIGUSR1, signal.SIGUSR2)
EXIT_LOST = 70  # EX_SOFTWARE: the fork server vanished while the child ran
FDS_MARKER = b"F"

SOCKET_PATH = ""  # filled in by warm_launcher.write_shim
TARGET = ""  # filled in by warm_launcher.write_shim
#: A server that accepts but does not answer (stopped, wedged) must not hold the message up.
ANSWER_TIMEOUT_S = 10.0


#: Signals that arrived before the child's pid was known: forwarded once it is, or, if the
#: shim falls back to running cold, acted on as the real program would have been.
_EARLY_SIGNALS: list[int] = []
#: The forwarded signals the shim was not started ignoring (under nohup SIGHUP stays ignored).
_HANDLED: list[int] = []


def _hold_signals() -> None:
    """From the first instruction on, a signal must not kill the shim with the default
    action mid-handshake (the child would be killed without it and the exit status would
    not be the child's): hold it until the child is known."""
    _HANDLED[:] = [sig for sig in FORWARDED if signal.getsignal(sig) is not signal.SIG_IGN]
    for sig in _HANDLED:
        signal.signal(sig, lambda signum, _frame: _EARLY_SIGNALS.append(signum))


def _note(text: str) -> None:
    """One line on stderr, which Flower appends to the SuperNode's log."""
    with contextlib.suppress(OSError):
        os.write(2, f"fedtune warm launcher: {text}\n".encode(errors="replace"))


def _cold(reason: str) -> None:
    """Run the real program in this process (never returns)."""
    for sig in _HANDLED:  # back to what exec'd programs inherit (ignored ones stay so)
        signal.signal(sig, signal.SIG_DFL)
    if _EARLY_SIGNALS:  # it was told to stop before it started: stop as it would have
        _note(f"{reason}; got signal {_EARLY_SIGNALS[0]} before starting {TARGET}")
        os.kill(os.getpid(), _EARLY_SIGNALS[0])
        sys.exit(128 + _EARLY_SIGNALS[0])  # a signal whose default action is not to end
    _note(f"{reason}; starting {TARGET} cold")
    os.execv(TARGET, [TARGET, *sys.argv[1:]])


def _std_fds() -> list[int]:
    fds = []
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            continue  # closed: the child gets /dev/null there
        fds.append(fd)
    return fds


def _request(conn: socket.socket) -> tuple[dict[str, object], io.BufferedReader]:
    """Send the request; return the server's answer and the reader for the rest."""
    fds = _std_fds()
    payload = json.dumps({"protocol": PROTOCOL, "target": TARGET, "argv": sys.argv,
                          "env": dict(os.environ), "cwd": os.getcwd(), "fds": fds}).encode()
    conn.sendall(struct.pack("!I", len(payload)) + payload)
    reader = conn.makefile("rb")
    answer = _answer(reader)
    if answer.get("ready") is True:
        socket.send_fds(conn, [FDS_MARKER], fds)
        answer = _answer(reader)
    return answer, reader


def _answer(reader: io.BufferedReader) -> dict[str, object]:
    line = reader.readline()
    if not line:
        raise ConnectionError("the fork server closed the connection without answering")
    answer: dict[str, object] = json.loads(line)
    return answer


def _relay(conn: socket.socket, reader: io.BufferedReader, pid: object) -> None:
    """Forward signals to the child and exit as it did (never returns)."""

    def forward(signum: int, _frame: object) -> None:
        with contextlib.suppress(OSError):
            conn.sendall(json.dumps({"signal": signum}).encode() + b"\n")

    for sig in _HANDLED:
        signal.signal(sig, forward)
    while _EARLY_SIGNALS:
        forward(_EARLY_SIGNALS.pop(0), None)
    for line in reader:
        status = json.loads(line)
        if "exit" in status:
            sys.exit(int(status["exit"]))
        if "killed" in status:
            signum = int(status["killed"])
            with contextlib.suppress(OSError, ValueError):  # SIGKILL/SIGSTOP: not settable
                signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            sys.exit(128 + signum)
    _note(f"lost the fork server while ClientApp process {pid} ran")
    sys.exit(EXIT_LOST)


def main() -> None:
    if not SOCKET_PATH or not TARGET:
        sys.exit("fedtune warm launcher: this is a template; install it with "
                 "client.node.warm_launcher.write_shim")
    _hold_signals()
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.settimeout(ANSWER_TIMEOUT_S)
    try:
        conn.connect(SOCKET_PATH)
        answer, reader = _request(conn)
        conn.settimeout(None)
    except (OSError, ValueError) as err:
        conn.close()
        _cold(f"no fork server at {SOCKET_PATH} ({err})")
    if "refused" in answer:
        conn.close()
        _cold(f"the fork server refused: {answer['refused']}")
    _relay(conn, reader, answer.get("pid"))


if __name__ == "__main__":
    main()
