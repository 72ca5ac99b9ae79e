"""Progress for long runs: a one-line bar on a terminal, periodic log lines otherwise."""

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


class ProgressBar:
    """Tiles done / total, MP/s and ETA for the image in progress, plus one line per finished image."""

    def __init__(self, stream=None, interval: float = 10.0, enabled: bool = True):
        self.stream = stream or sys.stderr
        self.tty = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.interval = interval
        self.enabled = enabled
        self._reset("", 0, 0)

    def _reset(self, name: str, total: int, done: int) -> None:
        self.name, self.total, self.done, self.resumed = name, total, done, done
        self.megapixels = 0.0
        self.t0 = self.last = time.monotonic()

    def start_image(self, name: str, total_tiles: int, done_tiles: int) -> None:
        self._reset(name, total_tiles, done_tiles)
        if done_tiles:
            log.info("%s: resuming, %d of %d tiles already done", name, done_tiles, total_tiles)
        self._show(force=True)

    def advance(self, tiles: int, megapixels: float) -> None:
        self.done += tiles
        self.megapixels += megapixels
        self._show()

    def _line(self) -> str:
        elapsed = max(time.monotonic() - self.t0, 1e-9)
        rate = self.megapixels / elapsed
        run = self.done - self.resumed
        eta = (self.total - self.done) * elapsed / run if run else float("nan")
        width = 24
        fill = int(width * self.done / self.total) if self.total else width
        bar = "#" * fill + "-" * (width - fill)
        return f"{self.name} [{bar}] {self.done}/{self.total} tiles  {rate:.2f} MP/s  ETA {_fmt_eta(eta)}"

    def _show(self, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if self.tty:
            self.stream.write("\r\033[K" + self._line())
            self.stream.flush()
        elif force or now - self.last >= self.interval or self.done == self.total:
            log.info(self._line())
            self.last = now

    def end_image(self, result: ImageResult) -> None:
        if self.tty and self.enabled:
            self.stream.write("\r\033[K")
            self.stream.flush()
        detail = result.error if result.status == "failed" else f"{result.tiles} tiles, {result.seconds:.1f} s"
        log.info("%s: %s (%s)", result.name, result.status, detail)
