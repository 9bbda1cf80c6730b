"""What the console scripts (``nadmm-register``, ``nadmm-tune``, ``nadmm-apply``) share: the
parser that reports a bad command line as one line, and the entry wrapper that turns every
outcome into an exit status and at most one line ``PROG: error: …`` on stderr.

Exit statuses: 0 done, 1 failure, 2 usage, 130 interrupted (Ctrl-C), 143 terminated (SIGTERM,
for a tool that asks for it: handled as Ctrl-C is, so the tool's clean-up runs).
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from .checks import one_line

__all__ = ["UsageError", "Parser", "Terminated", "print_error", "run_console", "one_line"]


class UsageError(Exception):
    """A bad command line (exit status 2)."""


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors raise :class:`UsageError` (one line, pointing to
    ``--help``) instead of printing the usage and exiting."""

    def error(self, message: str):  # argparse hook
        raise UsageError(f"{message} (see {self.prog} --help)")


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the tool runs so that it is handled as Ctrl-C is."""


def _on_sigterm(signum, frame):  # noqa: ARG001 - signal handler signature
    raise Terminated


@contextmanager
def _sigterm_raises(enabled: bool) -> Iterator[None]:
    """While the block runs, SIGTERM raises :class:`Terminated` (main thread only: Python
    installs signal handlers there alone)."""
    previous = None
    if enabled and threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def print_error(prog: str, message: object) -> None:
    """``PROG: error: MESSAGE`` on stderr, on one line."""
    print(f"{prog}: error: {one_line(message)}", file=sys.stderr)


def run_console(
    prog: str,
    parse: Callable[[], argparse.Namespace],
    run: Callable[[argparse.Namespace], int],
    *,
    interrupted: str | Callable[[argparse.Namespace], str],
    terminated: str | None = None,
    expected: tuple[type[BaseException], ...] = (),
    failures: tuple[type[BaseException], ...] = (OSError, RuntimeError, ValueError),
    failure_type: bool = True,
) -> int:
    """A console script's body: parse, run, and map the outcome to an exit status.

    Args:
        prog: the script's name, the prefix of every error line.
        parse: returns the parsed arguments; :class:`UsageError` means a bad command line (2),
            ``SystemExit`` is ``--help`` / ``--version`` (its code).
        run: does the work; returns the exit status.
        interrupted: the message on Ctrl-C (130), or a function of the arguments giving it.
        terminated: the message on SIGTERM (143); ``None`` leaves SIGTERM to its default.
        expected: exceptions whose message is meant for the user as it is (1).
        failures: other exceptions reported on one line (1); ``failure_type`` prefixes their
            type's name (``OSError: …``). ``MemoryError`` is "out of memory" (1). Anything
            else propagates (a bug: the traceback is the report).
    """
    try:
        args = parse()
    except UsageError as exc:
        print_error(prog, exc)
        return 2
    except SystemExit as exc:  # --help / --version
        return int(exc.code or 0)
    with _sigterm_raises(terminated is not None):
        try:
            return run(args)
        except expected as exc:
            print_error(prog, exc)
        except Terminated:
            print_error(prog, terminated)
            return 143
        except KeyboardInterrupt:
            print_error(prog, interrupted(args) if callable(interrupted) else interrupted)
            return 130
        except MemoryError:
            print_error(prog, "out of memory")
        except failures as exc:
            print_error(prog, f"{type(exc).__name__}: {one_line(exc)}" if failure_type else exc)
    return 1
