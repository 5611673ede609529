"""The daemon's side of the systemd protocols: sd_notify, watchdog, socket activation.

Implemented with the standard library only, following the protocols described
in the sd_notify(3) and sd_listen_fds(3) manual pages. Every function here does
nothing and returns quietly when the daemon does not run under systemd.
"""

import os
import socket
from collections.abc import Awaitable, Callable, Mapping, MutableMapping

import anyio
import structlog

from events.errors import DstackdError

log = structlog.get_logger(__name__)

# The first descriptor systemd passes; 0-2 are stdin, stdout and stderr.
LISTEN_FDS_START = 3


class SocketActivationError(DstackdError):
    """The socket activation variables or descriptors are invalid."""

    def __init__(self, problem: str) -> None:
        super().__init__(
            f"socket activation failed: {problem}; check the ListenStream= "
            "lines of the socket unit"
        )


def sd_notify(message: str) -> bool:
    """Send ``message`` (e.g. ``READY=1``) to the socket in ``$NOTIFY_SOCKET``.

    Returns False without sending when ``NOTIFY_SOCKET`` is unset, names an
    address family this module does not support, or the send fails. A failure
    is logged, because systemd then receives no readiness or keep-alive message
    from the daemon.
    """
    notify_socket = os.environ.get("NOTIFY_SOCKET", "")
    if not notify_socket:
        return False

    error = _send(notify_socket, message)
    if error is not None:
        log.warning(
            "sd_notify_failed",
            notify_socket=notify_socket,
            message=message,
            error=error,
        )
        return False

    return True


def _send(notify_socket: str, message: str) -> str | None:
    """Send ``message`` to ``notify_socket``; return the error text on failure."""
    # A leading "@" names a socket in the abstract namespace, whose address
    # starts with a NUL byte instead.
    address = notify_socket
    if notify_socket.startswith("@"):
        address = "\0" + notify_socket[1:]
    elif not notify_socket.startswith("/"):
        # NOTE: systemd 253 and later may pass a "vsock:" address here (for
        # virtual machines); it is not supported, so no message is sent.
        return "unsupported address family"

    try:
        with socket.socket(
            socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC
        ) as sock:
            sock.connect(address)
            sock.sendall(message.encode())
    except OSError as exc:
        return str(exc)

    return None


def notify_ready(status: str | None = None) -> bool:
    """Tell systemd that start-up finished and the socket accepts requests."""
    if status is None:
        return sd_notify("READY=1")

    return sd_notify(f"READY=1\nSTATUS={_one_line(status)}")


def notify_stopping() -> bool:
    """Tell systemd that shutdown began, so it waits instead of restarting."""
    return sd_notify("STOPPING=1")


def notify_status(text: str) -> bool:
    """Set the status line that ``systemctl status`` shows."""
    return sd_notify(f"STATUS={_one_line(text)}")


def notify_watchdog() -> bool:
    """Send one watchdog keep-alive ping."""
    return sd_notify("WATCHDOG=1")


def watchdog_interval(
    env: Mapping[str, str] = os.environ, pid: int | None = None
) -> float | None:
    """Return the watchdog timeout in seconds, or None when no watchdog is set.

    The timeout comes from ``WATCHDOG_USEC``. When ``WATCHDOG_PID`` is set and
    differs from ``pid`` (this process by default), the watchdog belongs to
    another process and None is returned.
    """
    usec_text = env.get("WATCHDOG_USEC", "")
    if not usec_text:
        return None

    pid_text = env.get("WATCHDOG_PID", "")
    if pid_text:
        if pid is None:
            pid = os.getpid()

        if not pid_text.isdigit() or int(pid_text) != pid:
            return None

    if not usec_text.isdigit() or int(usec_text) == 0:
        log.warning("watchdog_usec_invalid", watchdog_usec=usec_text)
        return None

    return int(usec_text) / 1_000_000


async def watchdog_loop(
    interval: float,
    *,
    sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
) -> None:
    """Ping the watchdog every ``interval / 2`` seconds until cancelled.

    Run it as a task next to the server, e.g. ``task_group.start_soon(
    watchdog_loop, interval)``. Pinging at half the timeout is what
    sd_watchdog_enabled(3) recommends. A failed ping is logged once per run of
    failures, not every period. ``sleep`` is replaceable for tests.
    """
    period = interval / 2
    failures = 0
    log.info("watchdog_started", interval_s=interval, period_s=period)
    while True:
        notify_socket = os.environ.get("NOTIFY_SOCKET", "")
        error = _send(notify_socket, "WATCHDOG=1") if notify_socket else None
        if error is not None:
            failures += 1
            if failures == 1:
                log.warning("watchdog_ping_failed", error=error)
        elif failures:
            log.info("watchdog_ping_recovered", failed_pings=failures)
            failures = 0

        await sleep(period)


def listen_fds(
    env: MutableMapping[str, str] = os.environ,
    *,
    unset_environment: bool = True,
) -> list[socket.socket]:
    """Return the sockets systemd passed by socket activation, in order.

    Reads ``LISTEN_PID`` and ``LISTEN_FDS``. The sockets are descriptors 3 and
    up. They are returned only when ``LISTEN_PID`` is this process, and they
    get the close-on-exec flag so run processes do not inherit them. With
    ``unset_environment`` the variables (and ``LISTEN_FDNAMES``) are removed
    from ``env`` in every case, so child processes never see them.

    Raises:
        SocketActivationError: ``LISTEN_FDS`` or ``LISTEN_PID`` is not a
            number, or a passed descriptor is not an open socket.
    """
    pid_text = env.get("LISTEN_PID", "")
    count_text = env.get("LISTEN_FDS", "")
    if unset_environment:
        for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            env.pop(name, None)

    if not pid_text or not count_text:
        return []

    if not pid_text.isdigit():
        raise SocketActivationError(f"LISTEN_PID={pid_text!r} is not a process id")

    if int(pid_text) != os.getpid():
        return []

    if not count_text.isdigit():
        raise SocketActivationError(f"LISTEN_FDS={count_text!r} is not a count")

    count = int(count_text)
    sockets = []
    for fd in range(LISTEN_FDS_START, LISTEN_FDS_START + count):
        sockets.append(_adopt_socket(fd))

    log.info("listen_fds_received", count=count)

    return sockets


def _adopt_socket(fd: int) -> socket.socket:
    try:
        os.set_inheritable(fd, False)
        # With fileno given, Python reads the family, type and protocol from
        # the descriptor itself.
        return socket.socket(fileno=fd)
    except OSError as exc:
        raise SocketActivationError(
            f"descriptor {fd} is not an open socket ({exc.strerror or exc})"
        ) from exc


def _one_line(text: str) -> str:
    # A newline would start a new variable assignment in the notify message.
    return " ".join(text.splitlines())
