"""The ``dstackd`` command: serve the daemon, repair its log."""

import sys

import click

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
    import anyio

    from dstackd.paths import resolve_paths
    from events.log import repair

    paths = resolve_paths(data_dir, None)
    result = anyio.run(repair, paths.log_db)
    click.echo(str(result))
