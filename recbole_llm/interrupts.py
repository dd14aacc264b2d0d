"""Ctrl-C in a command-line run: acted on between log records and writes; the last line is whole.

Python raises ``KeyboardInterrupt`` at the next bytecode after SIGINT, wherever that is: in the middle of a log
record (RecBole's colour-stripping stream writes one record in several pieces), of a tqdm refresh or of a
``print``. The record is then cut, and the CLI's one-line message was printed on the same line.

``guarded()`` wraps a CLI run:
- while a log record is handled (every handler: terminal and log file) and while ``sys.stdout`` / ``sys.stderr``
  are written, SIGINT only sets a flag; the ``KeyboardInterrupt`` is raised as soon as that record or write is
  complete. A second Ctrl-C while one is pending is acted on at once (a write blocked on a full pipe can still be
  left);
- ``last_line(text)`` prints the CLI's closing line on stderr, always starting on a fresh line.
Checkpoints need no deferral: ``compat.atomic_save`` replaces a file only by a complete one.
"""
import contextlib
import logging
import os
import signal
import sys
import threading


class _State:
    depth = 0  # main-thread sections in which SIGINT is deferred
    pending = False  # a deferred SIGINT, raised when the outermost section ends
    last_stream = None  # the guarded stream written last, and whether that write ended a line
    last_ended_line = True


class _Deferred:
    """A section in which SIGINT is deferred (main thread only: signal handlers run there)."""

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            _State.depth += 1
            self.counted = True
        else:
            self.counted = False

    def __exit__(self, *exc):
        if not self.counted:
            return False
        _State.depth -= 1
        if _State.depth == 0 and _State.pending:
            _State.pending = False
            raise KeyboardInterrupt
        return False


def deferred():
    """``with deferred():`` the body runs to its end before a Ctrl-C that lands in it is raised."""
    return _Deferred()


def _on_sigint(signum, frame):
    if _State.depth and not _State.pending:
        _State.pending = True
    else:  # outside a record or a write, or pressed again
        _State.pending = False
        raise KeyboardInterrupt


class _Stream:
    """``sys.stdout`` / ``sys.stderr``: each write completes before a Ctrl-C is raised; tracks line ends."""

    def __init__(self, stream):
        self._stream = stream
        self.ended_line = True

    def write(self, text):
        with _Deferred():
            written = self._stream.write(text)
        if text:
            self.ended_line = text.endswith("\n")
            _State.last_stream, _State.last_ended_line = self, self.ended_line
        return written

    def __getattr__(self, name):
        return getattr(self._stream, name)


def _call_handlers(original):
    def call_handlers(self, record):  # every handler of one record: terminal and log file
        with _Deferred():
            return original(self, record)

    call_handlers.deferring = True
    return call_handlers


def _same_target(a, b):
    """Whether two streams write to the same file or terminal (then one line position is shared)."""
    try:
        return os.path.samestat(os.fstat(a.fileno()), os.fstat(b.fileno()))
    except (AttributeError, OSError, ValueError):
        return False


class Guard:
    def __init__(self, stdout, stderr):
        self.stdout, self.stderr = stdout, stderr

    def last_line(self, text):
        """``text`` on stderr as a line of its own, after everything already written; Ctrl-C no longer cuts it."""
        previous = signal.getsignal(signal.SIGINT) if threading.current_thread() is threading.main_thread() else None
        if previous is _on_sigint:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(Exception):
                    stream.flush()
            ended = self.stderr.ended_line
            if _State.last_stream is self.stdout and _same_target(self.stdout, self.stderr):
                ended = _State.last_ended_line
            self.stderr.write(("" if ended else "\n") + text + "\n")
            self.stderr.flush()
        finally:
            if previous is _on_sigint:
                signal.signal(signal.SIGINT, previous)


@contextlib.contextmanager
def guarded():
    """For the length of a CLI run: deferred Ctrl-C around log records and stream writes (see the module)."""
    saved_streams = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = _Stream(sys.stdout), _Stream(sys.stderr)
    guard = Guard(sys.stdout, sys.stderr)
    saved_call_handlers = logging.Logger.callHandlers
    if not getattr(saved_call_handlers, "deferring", False):
        logging.Logger.callHandlers = _call_handlers(saved_call_handlers)
    # Only where Ctrl-C raises KeyboardInterrupt now: a background job (``cmd &``) has it ignored, and keeps that.
    main_thread = threading.current_thread() is threading.main_thread()
    saved_signal = signal.getsignal(signal.SIGINT) if main_thread else None
    if saved_signal is signal.default_int_handler:
        signal.signal(signal.SIGINT, _on_sigint)
    _State.depth, _State.pending = 0, False
    _State.last_stream, _State.last_ended_line = None, True
    try:
        yield guard
    finally:
        if saved_signal is signal.default_int_handler:
            signal.signal(signal.SIGINT, saved_signal)
        logging.Logger.callHandlers = saved_call_handlers
        # RecBole's init_logger (colorama) may have wrapped our streams in turn: put back what was there
        sys.stdout, sys.stderr = saved_streams
        _State.depth, _State.pending, _State.last_stream = 0, False, None
