"""What the ``segquant`` commands write: results on stdout (``cli.py``), progress and log records on stderr, at
one of three verbosities, and without the libraries' noise at the default one.

- ``-q`` (``QUIET``): errors only: no results, no progress, no warnings.
- default (``NORMAL``): our results, progress and warnings; the libraries' (torch, torchao, diffusers,
  transformers, ModelOpt) warnings, log records below ERROR and ModelOpt's prints are left out.
- ``-v`` (``VERBOSE``): also our INFO records and everything the libraries say.

Import-time warnings happen when a library is first imported: the commands import torchao, diffusers and
ModelOpt inside the command, after ``command_output`` has installed its filters.

Example:
    >>> with command_output(NORMAL):
    ...     with Progress("calibrating", total=4, unit="batch") as bar:
    ...         for batch in batches:
    ...             model(batch)
    ...             bar.update()
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
import warnings
from typing import Any, Iterable, Iterator, TextIO

QUIET, NORMAL, VERBOSE = -1, 0, 1

OWN_LOGGERS = ("segquant", "segquant_modelopt", "segquant_torchao")
LIBRARY_LOGGERS = ("torch", "torchao", "diffusers", "transformers", "modelopt", "huggingface_hub", "accelerate",
                   "onnx", "onnxscript", "onnxruntime", "triton", "PIL", "matplotlib")
"""Loggers kept at ERROR below ``-v`` (those libraries' own warnings say nothing a segquant user can act on)."""
LIBRARY_VERBOSITY_ENV = {"DIFFUSERS_VERBOSITY": "error", "TRANSFORMERS_VERBOSITY": "error"}
"""diffusers and transformers set their logger's level from these when they are first imported."""
_OWN_MODULES = r"segquant(_modelopt|_torchao)?(\.|$)"
_LEVELS = {QUIET: logging.ERROR, NORMAL: logging.WARNING, VERBOSE: logging.INFO}
LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"


@contextlib.contextmanager
def command_output(verbosity: int = NORMAL) -> Iterator[None]:
    """Warning filters, logger levels and a stderr log handler for the duration of one command; all put back
    afterwards (the command line can be run in-process, e.g. by tests).

    Args:
        verbosity: ``QUIET``, ``NORMAL`` or ``VERBOSE``.
    """
    if verbosity not in _LEVELS:
        raise ValueError(f"verbosity must be one of {sorted(_LEVELS)}, got {verbosity!r}")
    quiet_libraries = verbosity < VERBOSE
    loggers = [logging.getLogger(n) for n in (*OWN_LOGGERS, *(LIBRARY_LOGGERS if quiet_libraries else ()))]
    saved = [(logger, logger.level) for logger in loggers]
    root = logging.getLogger()
    root_level = root.level
    handler = None
    if not any(type(h) is logging.StreamHandler for h in root.handlers):  # the command line itself: none yet
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        root.addHandler(handler)
    env = {k: v for k, v in LIBRARY_VERBOSITY_ENV.items() if k not in os.environ} if quiet_libraries else {}
    os.environ.update(env)
    try:
        with warnings.catch_warnings():
            _filter_warnings(verbosity)
            for logger in loggers:
                is_own = logger.name in OWN_LOGGERS
                logger.setLevel(_LEVELS[verbosity] if is_own else logging.ERROR)
            if verbosity == VERBOSE:
                root.setLevel(logging.INFO)
            yield
    finally:
        for logger, level in saved:
            logger.setLevel(level)
        root.setLevel(root_level)
        if handler is not None:
            root.removeHandler(handler)
        for key in env:
            os.environ.pop(key, None)


def _filter_warnings(verbosity: int) -> None:
    if verbosity == QUIET:
        warnings.simplefilter("ignore")
    elif verbosity == NORMAL:  # ours (attributed to a segquant module) stay; every library's go
        warnings.filterwarnings("ignore")
        warnings.filterwarnings("default", module=_OWN_MODULES)
    else:
        warnings.simplefilter("default")


def is_terminal(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False


class Progress:
    """One long step of a command: a tqdm bar when stderr is a terminal; otherwise (a log file, a pipe) one
    plain line when the step ends (none when it fails), and one a minute while it runs, so logs hold no ``\\r``
    or escape codes; nothing when ``enabled`` is False. Steps are never nested: one bar at a time.

    Args:
        desc: what the step does (``calibrating``).
        total: the number of updates the step makes, if known.
        unit: what one update is (``step``, ``prompt``).
        enabled: False for no output at all (``-q``, ``show_progress=False``).
        stream: where to write (default: ``sys.stderr`` at construction).
    """

    PLAIN_INTERVAL_S = 60.0

    def __init__(self, desc: str, total: int | None = None, unit: str = "it", enabled: bool = True,
                 stream: TextIO | None = None) -> None:
        self.desc, self.total, self.unit, self.n = desc, total, unit, 0
        self.stream = sys.stderr if stream is None else stream
        self._start = self._last = time.monotonic()
        self._bar: Any = None
        self._plain = enabled and not is_terminal(self.stream)
        self._closed = not enabled
        if enabled and not self._plain:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, desc=desc, unit=unit, file=self.stream, dynamic_ncols=True)

    def update(self, n: int = 1) -> None:
        self.n += n
        if self._bar is not None:
            self._bar.update(n)
        elif self._plain and time.monotonic() - self._last >= self.PLAIN_INTERVAL_S:
            self._line()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
        else:
            self._line()

    def _line(self) -> None:
        self._last = time.monotonic()
        count = f"{self.n}/{self.total}" if self.total is not None else str(self.n)
        unit = self.unit if (self.total if self.total is not None else self.n) == 1 else _plural(self.unit)
        self.stream.write(f"{self.desc}: {count} {unit} in {self._last - self._start:.1f} s\n")
        self.stream.flush()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        if exc_type is not None and self._bar is None:
            self._closed = True  # no "done" line for a step that failed: its error says what happened
        self.close()


def _plural(unit: str) -> str:
    return unit + ("es" if unit.endswith(("s", "x", "ch", "sh")) else "s")


def progress(items: Iterable[Any], desc: str, unit: str = "it", enabled: bool = True) -> Iterator[Any]:
    """``items`` with a ``Progress`` over them (``total`` is ``len(items)`` when it has one)."""
    total = len(items) if hasattr(items, "__len__") else None  # type: ignore[arg-type]
    with Progress(desc, total, unit, enabled) as bar:
        for item in items:
            yield item
            bar.update()
