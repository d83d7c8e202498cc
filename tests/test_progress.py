"""The progress reporter: silent unless its stream is a terminal, one redrawn line if it is."""

from __future__ import annotations

import io

import pytest

from nvo3 import progress
from nvo3.progress import Progress


class FakeTty(io.StringIO):
    def isatty(self) -> bool:
        return True


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(autouse=True)
def terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NVO3_NO_PROGRESS", raising=False)
    monkeypatch.setenv("TERM", "xterm")
    monkeypatch.setenv("COLUMNS", "200")


def test_writes_nothing_when_the_stream_is_not_a_terminal() -> None:
    out = io.StringIO()  # isatty() is False: a pipe, a file, a CI log
    with Progress("load", 1000, stream=out) as bar:
        for _ in range(1000):
            bar.advance()
        bar.set_note("done")
        bar.echo("a log line")
    assert out.getvalue() == "a log line\n"
    assert not progress._active


def test_writes_nothing_when_disabled_even_on_a_terminal() -> None:
    out = FakeTty()  # e.g. a command run with --json
    with Progress("load", 10, stream=out, enabled=False) as bar:
        bar.advance(10)
    assert out.getvalue() == ""


def test_no_progress_environment_variable_silences_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NVO3_NO_PROGRESS", "1")
    out = FakeTty()
    with Progress("load", 10, stream=out) as bar:
        bar.advance(10)
    assert out.getvalue() == ""


def test_renders_a_bar_with_count_rate_and_eta_on_a_terminal() -> None:
    out, clock = FakeTty(), Clock()
    with Progress("load 1M", 1_000_000, stream=out, clock=clock) as bar:
        clock.now += 2.0
        bar.update(250_000)
        assert bar.render() == "load 1M [#####...............]  25% 250k/1.0M 125k/s ETA 0:06"
        clock.now += 0.01
        bar.update(260_000)  # within the redraw interval: not drawn
        clock.now += 0.2
        bar.update(270_000)
    text = out.getvalue()
    assert text.count("\r") == 4  # first draw, 250k, 270k, cleared on close
    assert "250k/1.0M" in text
    assert "260k" not in text
    assert "270k/1.0M" in text
    assert text.endswith("\r\x1b[K")  # the line is left empty
    assert "\n" not in text


def test_nested_bars_share_one_line_and_echo_keeps_it_whole() -> None:
    out, clock = FakeTty(), Clock()
    log = io.StringIO()
    with Progress("bench", 3, stream=out, clock=clock) as stages:
        stages.set_note("cold_sync")
        with Progress("sync", 500, stream=out, clock=clock) as inner:
            inner.update(500)
            assert out.getvalue().endswith(
                "\r\x1b[Kbench [....................] 0/3 0:00 cold_sync"
                " | sync [####################] 100% 500/500 0:00")
            stages.echo("row 1", file=log)
        assert out.getvalue().endswith("\r\x1b[Kbench [....................] 0/3 0:00 cold_sync")
        stages.advance()
    assert log.getvalue() == "row 1\n"
    assert out.getvalue().endswith("\r\x1b[K")
    assert not progress._active


def test_echo_to_the_same_terminal_clears_the_line_first() -> None:
    out = FakeTty()
    with Progress("chaos", 5, stream=out) as bar:
        bar.echo("    1 kill_nve ...")
        bar.advance()
    lines = out.getvalue().split("\n")
    assert lines[0].endswith("\r\x1b[K    1 kill_nve ...")
