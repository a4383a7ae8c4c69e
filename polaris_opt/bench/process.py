"""A worker process: a fresh Python interpreter running polaris_opt.bench.worker, and its channel.

The worker is started with subprocess rather than multiprocessing's "spawn" start method:
spawn would run the parent's main script again in every worker (a script without an
`if __name__ == "__main__"` guard would then start workers of its own, and the CLI would pay
for importing itself once per worker). A fresh interpreter is what spawn gives too: nothing of
the parent's memory counts in the worker's peak RSS. The two sides talk over a socket pair with
multiprocessing's Connection (pickled messages). The worker's stdout goes nowhere, so nothing a
library prints can spoil `polaris-opt --json bench`; its stderr is kept in a temporary file
and its last line is shown if the worker dies.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import tempfile
from multiprocessing.connection import Connection
from typing import NoReturn

from polaris_opt.errors import BadInput, PolarisError

_WORKER_MAIN = "from polaris_opt.bench.worker import main; main()"


class WorkerProcess:
    """One worker; `label` names its contender in every error it raises."""

    def __init__(self, label: str):
        self.label = label
        ours, theirs = socket.socketpair()
        self._stderr = tempfile.TemporaryFile()
        self.process = subprocess.Popen(
            [sys.executable, "-c", _WORKER_MAIN, str(theirs.fileno())],
            pass_fds=(theirs.fileno(),),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=self._stderr,
        )
        theirs.close()  # the worker holds its end; its exit then shows here as end of file
        self.connection = Connection(ours.detach())

    def send(self, *message) -> None:
        try:
            self.connection.send(message)
        except OSError:
            self._died()

    def receive(self) -> tuple:
        """The worker's next reply; an error it reports is raised here, as BadInput or PolarisError."""
        try:
            reply = self.connection.recv()
        except (EOFError, OSError):
            self._died()
        if reply[0] == "error":
            _, code, message = reply
            error = BadInput if code == 2 else PolarisError
            raise error(f"{self.label}: {message}")
        return reply

    def ask(self, *message) -> tuple:
        self.send(*message)
        return self.receive()

    def stop(self) -> None:
        """End the worker (at once if it is still running) and free its channel and files."""
        if self.process.poll() is None:
            self.process.terminate()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.connection.close()
        self._stderr.close()

    def _died(self) -> NoReturn:
        try:
            code = self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            code = None
        said = self._last_stderr_line()
        raise PolarisError(
            f"{self.label}: its bench worker stopped (exit code {code})" + (f": {said}" if said else "")
        )

    def _last_stderr_line(self) -> str:
        self._stderr.seek(0)
        lines = [line.strip() for line in self._stderr.read().decode(errors="replace").splitlines()]
        lines = [line for line in lines if line]
        return lines[-1][:300] if lines else ""
