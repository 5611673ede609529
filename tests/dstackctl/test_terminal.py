"""Tests of the spinner and the watch loop in dstackctl.terminal."""

import pytest

from dstackctl import terminal


@pytest.fixture
def on_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(terminal, "stdout_is_terminal", lambda: True)


def stop_after_first_sleep(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Make ``time.sleep`` record its argument and raise KeyboardInterrupt."""
    sleeps: list[float] = []

    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        raise KeyboardInterrupt

    monkeypatch.setattr("dstackctl.terminal.time.sleep", sleep)
    return sleeps


@pytest.mark.usefixtures("on_terminal")
def test_spinner_on_terminal_draws_and_clears_its_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with terminal.Spinner("Provisioning local-1..."):
        pass

    output = capsys.readouterr().out
    assert output.startswith(f"{terminal.CLEAR_LINE}| Provisioning local-1...")
    assert output.endswith(terminal.CLEAR_LINE)


def test_spinner_writes_nothing_when_piped(capsys: pytest.CaptureFixture[str]) -> None:
    with terminal.Spinner("Provisioning local-1..."):
        pass

    assert capsys.readouterr().out == ""


@pytest.mark.usefixtures("on_terminal")
def test_watch_on_terminal_clears_screen_before_each_view(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    sleeps = stop_after_first_sleep(monkeypatch)

    exit_code = terminal.watch(lambda: "TABLE", "dstackctl ps")

    output = capsys.readouterr().out
    assert exit_code == 0
    assert sleeps == [terminal.WATCH_INTERVAL_S]
    assert output.startswith(f"{terminal.CLEAR_SCREEN}Every 1s: dstackctl ps  ")
    assert output.endswith("\n\nTABLE\n")


def test_watch_when_piped_separates_views_with_blank_lines(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    stop_after_first_sleep(monkeypatch)

    terminal.watch(lambda: "TABLE", "dstackctl ps")

    assert capsys.readouterr().out == "TABLE\n\n"
