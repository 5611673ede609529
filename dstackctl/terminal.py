"""Terminal output of dstackctl: JSON for scripts, live views and spinners.

Animations and ANSI escape codes are written only when stdout is a terminal,
so piped output stays plain text.
"""

import json
import sys
import time
from collections.abc import Callable
from datetime import datetime
from types import TracebackType
from typing import Any

import click

WATCH_INTERVAL_S = 1.0
# Move the cursor home, then clear the screen.
CLEAR_SCREEN = "\x1b[H\x1b[2J"
# Return to the start of the line, then clear it.
CLEAR_LINE = "\r\x1b[K"
_SPINNER_FRAMES = "|/-\\"
_SPINNER_INTERVAL_S = 0.1


def echo_json(value: Any) -> None:
    """Print a decoded JSON value for scripts, indented."""
    click.echo(json.dumps(value, indent=2))


def stdout_is_terminal() -> bool:
    return sys.stdout.isatty()


def watch(render: Callable[[], str], title: str) -> int:
    """Print ``render()`` every ``WATCH_INTERVAL_S`` seconds until Ctrl-C.

    On a terminal each view replaces the previous one under a title line; piped
    output gets each view followed by a blank line. Ctrl-C is the normal way to
    end a watch, so it returns exit code 0. Errors from ``render`` propagate.
    """
    terminal = stdout_is_terminal()
    try:
        while True:
            text = render()
            if terminal:
                now = datetime.now().strftime("%H:%M:%S")
                # Written directly, since click.echo drops ANSI codes when it
                # decides that the stream is no terminal.
                sys.stdout.write(CLEAR_SCREEN)
                click.echo(f"Every {WATCH_INTERVAL_S:g}s: {title}  {now}\n\n{text}")
            else:
                click.echo(f"{text}\n")

            time.sleep(WATCH_INTERVAL_S)
    except KeyboardInterrupt:
        return 0


class Spinner:
    """Animates ``message`` on stdout in a thread while a ``with`` block waits.

    It does nothing unless stdout is a terminal, and it clears its line on
    exit so that the next output starts on a clean line.
    """

    def __init__(self, message: str) -> None:
        self.message = message
        self._enabled = stdout_is_terminal()
        self._stop: Any = None
        self._thread: Any = None

    def __enter__(self) -> "Spinner":
        if not self._enabled:
            return self

        # Imported here because only a waiting command on a terminal needs it.
        import threading

        self._stop = threading.Event()
        self._write_frame(0)
        self._thread = threading.Thread(target=self._spin, daemon=True)
        self._thread.start()

        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._thread is None:
            return

        self._stop.set()
        self._thread.join()
        sys.stdout.write(CLEAR_LINE)
        sys.stdout.flush()

    def _spin(self) -> None:
        frame = 1
        while not self._stop.wait(_SPINNER_INTERVAL_S):
            self._write_frame(frame)
            frame += 1

    def _write_frame(self, frame: int) -> None:
        symbol = _SPINNER_FRAMES[frame % len(_SPINNER_FRAMES)]
        sys.stdout.write(f"{CLEAR_LINE}{symbol} {self.message}")
        sys.stdout.flush()
