"""Progress bars: tqdm (a notebook widget in Jupyter, text on stderr elsewhere), or nothing.

The library shows a bar only when asked (``progress=True``); the command line asks only
when stderr is a terminal, so log files get whole log lines and no redraws. While a bar
is shown, cndiff's log lines are written above it (not glued onto it).
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator

__all__ = ["progress_bar", "NoBar"]


class NoBar:
    """A bar that shows nothing (``progress=False``)."""

    def __enter__(self) -> NoBar:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def _in_notebook() -> bool:
    shell = sys.modules.get("IPython")
    if shell is None:
        return False
    try:
        ip = shell.get_ipython()  # type: ignore[attr-defined]
    except Exception:
        return False
    return ip is not None and "IPKernelApp" in getattr(ip, "config", {})


@contextlib.contextmanager
def _redirect_logs(bar) -> Iterator[None]:
    """Send the ``cndiff`` logger's lines through ``bar.write`` while the bar is shown."""
    logger = logging.getLogger("cndiff")
    streams = [h for h in logger.handlers if isinstance(h, logging.StreamHandler)]
    if not streams:
        yield
        return

    class _Handler(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            try:
                bar.write(self.format(record), file=sys.stderr)
            except Exception:  # noqa: BLE001 - logging must never break the job
                self.handleError(record)

    handler = _Handler(streams[0].level)
    handler.setFormatter(streams[0].formatter)
    saved = logger.handlers[:]
    logger.handlers = [h for h in saved if h not in streams] + [handler]
    try:
        yield
    finally:
        logger.handlers = saved


class _Bar:
    """A tqdm bar whose first step is drawn at once (tqdm waits ``mininterval`` after the
    bar appears before it redraws, so a user would first see 0% for that long)."""

    def __init__(self, bar) -> None:
        self.bar = bar
        self.drawn = False

    def update(self, n: int = 1) -> None:
        self.bar.update(n)
        if n and not self.drawn:
            self.drawn = True
            self.bar.refresh()

    def close(self) -> None:
        self.bar.close()


@contextlib.contextmanager
def progress_bar(total: int, desc: str, enabled: bool, unit: str = "B"):
    """A progress bar (a no-op without ``enabled``); use as a context manager."""
    if not enabled:
        yield NoBar()
        return
    if _in_notebook():
        from tqdm.auto import tqdm
    else:
        from tqdm import tqdm
    from .text import escape

    bar = tqdm(
        total=total,
        desc=escape(desc, 60),
        unit=unit,
        unit_scale=unit == "B",
        unit_divisor=1024,
        file=sys.stderr,
        dynamic_ncols=True,
        mininterval=0.2,
        leave=False,
    )
    try:
        with _redirect_logs(bar):
            yield _Bar(bar)
    finally:
        bar.close()
