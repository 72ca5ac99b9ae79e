import io
import logging

from jobs.progress import ProgressBar, _fmt_eta
from pipeline.engine import ImageResult


def test_log_lines_when_not_a_terminal(caplog):
    bar = ProgressBar(stream=io.StringIO(), interval=0.0)
    with caplog.at_level(logging.INFO, logger="gigaseg.progress"):
        bar.start_image("scene", total_tiles=10, done_tiles=4)
        bar.advance(3, 0.75)
        bar.advance(3, 0.75)
        bar.end_image(ImageResult(name="scene", url="/x", status="ok", tiles=10, seconds=2.0))
    text = caplog.text
    assert "resuming, 4 of 10 tiles already done" in text
    assert "7/10 tiles" in text and "10/10 tiles" in text and "MP/s" in text and "ETA" in text
    assert "scene: ok (10 tiles, 2.0 s)" in text


def test_bar_on_a_terminal_redraws_one_line():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    stream = Tty()
    bar = ProgressBar(stream=stream)
    bar.start_image("scene", 4, 0)
    bar.advance(2, 0.5)
    out = stream.getvalue()
    assert out.count("\r") == 2 and "\n" not in out and "2/4 tiles" in out


def test_eta_format():
    assert _fmt_eta(65) == "01:05" and _fmt_eta(3725) == "1:02:05" and _fmt_eta(float("nan")) == "--:--"
