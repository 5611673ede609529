"""The ``dstackd`` command: serve the daemon, repair its log."""

import sys
from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    from events.log import RepairResult

EXIT_FAILED = 1


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """dstackd keeps pools of GPU and CPU instances and runs work on them."""


@main.command()
@click.option("--data-dir", type=click.Path(file_okay=False), help="Directory for the event log and run logs.")
@click.option("--socket", "socket_path", type=click.Path(dir_okay=False), help="Unix socket path to serve on.")
@click.option("--config", "config_path", type=click.Path(dir_okay=False, exists=True), help="TOML config file.")
def serve(data_dir: str | None, socket_path: str | None, config_path: str | None) -> None:
    """Serve the API on a Unix socket until SIGTERM or SIGINT."""
    import anyio

    from dstackd import systemd
    from dstackd.config import load_config
    from dstackd.daemon import Daemon
    from dstackd.logging import configure_logging
    from dstackd.paths import resolve_paths
    from events.errors import DstackdError

    try:
        config = load_config(config_path)
        configure_logging(config.daemon.log_level)
        paths = resolve_paths(data_dir, socket_path)
        sockets = systemd.listen_fds()
        daemon = Daemon(paths, config)
        anyio.run(daemon.serve, sockets[0] if sockets else None)
    except DstackdError as error:
        click.echo(f"dstackd: {error}", err=True)
        sys.exit(EXIT_FAILED)


@main.command("repair-log")
@click.option("--data-dir", type=click.Path(file_okay=False), help="Directory of the event log.")
def repair_log(data_dir: str | None) -> None:
    """Back up the event log and cut it after its last valid record."""
    import sqlite3

    from dstackd.logging import configure_logging
    from dstackd.paths import resolve_paths
    from events.errors import DstackdError
    from events.log import repair_file

    # The log line of a repair goes to stderr, and the sentences to stdout.
    configure_logging("warning")
    try:
        log_path = resolve_paths(data_dir, None).log_db
    except DstackdError as error:
        click.echo(f"dstackd: {error}", err=True)
        sys.exit(EXIT_FAILED)

    try:
        result = repair_file(log_path)
    except FileNotFoundError as error:
        click.echo(f"dstackd: {error}: check --data-dir", err=True)
        sys.exit(EXIT_FAILED)
    except (DstackdError, sqlite3.Error) as error:
        click.echo(f"dstackd: cannot repair event log {log_path}: {error}", err=True)
        sys.exit(EXIT_FAILED)

    click.echo(describe_repair(log_path, result))


def describe_repair(log_path: str, result: "RepairResult") -> str:
    """Describe what ``repair-log`` did to ``log_path``, in sentences."""
    if result.backup_path is None:
        return (
            f"Event log {log_path} is intact up to its head at position "
            f"{result.head_position}. Nothing was changed."
        )

    removed = _count(result.removed, "record")
    removed_snapshots = _count(result.removed_snapshots, "snapshot")
    lines = [
        f"Event log {log_path} was damaged at position {result.bad_position}: "
        + f"{result.problem}.",
        f"Backed up the damaged log to {result.backup_path}.",
        f"Kept the records up to position {result.head_position}, the new head.",
        f"Removed {removed} from position {result.bad_position} on, and "
        + f"{removed_snapshots}.",
    ]

    return "\n".join(lines)


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"
