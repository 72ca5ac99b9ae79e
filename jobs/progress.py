"""Progress for long runs: a one-line bar on a terminal, periodic log lines otherwise.

``StatusLine`` is the one mechanism (redraw a line on a terminal, else log it every ``interval`` seconds);
``ProgressBar`` draws a job's tiles with it, ``jobs.train.driver.ProgressWatcher`` a training run's steps.
"""

from __future__ import annotations

import logging
import sys
import time

from pipeline.engine import ImageResult

log = logging.getLogger("gigaseg.progress")


def _fmt_eta(seconds: float) -> str:
    if seconds != seconds or seconds == float("inf"):
        return "--:--"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


def bar(done: int, total: int, width: int = 24) -> str:
    """``[####----]`` for ``done`` of ``total``."""
    fill = int(width * done / total) if total else width
    return "[" + "#" * fill + "-" * (width - fill) + "]"


class StatusLine:
    """One line that changes: redrawn in place on a terminal, logged at most every ``interval`` s elsewhere
    (``force`` logs it now); ``logger`` takes the log lines."""

    def __init__(self, stream=None, interval: float = 10.0, enabled: bool = True, logger: logging.Logger = log):
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.interval = interval
        self.logger = logger
        self.last = time.monotonic()

    def show(self, line: str, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if self.tty:
            self.stream.write("\r\033[K" + line)
            self.stream.flush()
        elif force or now - self.last >= self.interval:
            self.logger.info(line)
            self.last = now

    def clear(self) -> None:
        """Wipe the redrawn line (a terminal only), so a log line can follow."""
        if self.tty:
            self.stream.write("\r\033[K")
            self.stream.flush()


class ProgressBar:
    """Tiles done / total, MP/s and ETA for the image in progress, plus one line per finished image."""

    def __init__(self, stream=None, interval: float = 10.0, enabled: bool = True):
        self.line = StatusLine(stream, interval, enabled)
        self._reset("", 0, 0)

    def _reset(self, name: str, total: int, done: int) -> None:
        self.name, self.total, self.done, self.resumed = name, total, done, done
        self.megapixels = 0.0
        self.t0 = time.monotonic()

    def start_image(self, name: str, total_tiles: int, done_tiles: int) -> None:
        self._reset(name, total_tiles, done_tiles)
        if done_tiles:
            log.info("%s: resuming, %d of %d tiles already done", name, done_tiles, total_tiles)
        self.line.show(self._line(), force=True)

    def advance(self, tiles: int, megapixels: float) -> None:
        self.done += tiles
        self.megapixels += megapixels
        self.line.show(self._line(), force=self.done == self.total)

    def _line(self) -> str:
        elapsed = max(time.monotonic() - self.t0, 1e-9)
        rate = self.megapixels / elapsed
        run = self.done - self.resumed
        eta = (self.total - self.done) * elapsed / run if run else float("nan")
        return (f"{self.name} {bar(self.done, self.total)} {self.done}/{self.total} tiles  {rate:.2f} MP/s  "
                f"ETA {_fmt_eta(eta)}")

    def end_image(self, result: ImageResult) -> None:
        if self.line.enabled:
            self.line.clear()
        detail = result.error if result.status == "failed" else f"{result.tiles} tiles, {result.seconds:.1f} s"
        log.info("%s: %s (%s)", result.name, result.status, detail)
