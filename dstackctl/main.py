"""The dstackctl command line: click commands over the dstackd socket API.

A command must start in a few tens of milliseconds, so this package imports
only click and the standard library on its normal path: never the daemon, its
msgspec schema, aiohttp, asyncio or http.client.
"""

import contextlib
import os
import sys
from datetime import UTC, datetime
from typing import Any

import click

from dstackctl import exit_codes, tables, terminal
from dstackctl.audit import cost, events, explain
from dstackctl.client import (
    DEFAULT_TIMEOUT_S,
    Client,
    ClientError,
    DaemonUnreachableError,
    api_path,
    default_socket_path,
)
from dstackctl.options import (
    describe_resource_args,
    drop_none,
    parse_env,
    resource_args,
    resource_options,
)
from dstackctl.attach import attach
from dstackctl.pool import json_option, pool
from dstackctl.run_config import apply, config_fields, file_option, profile_option

# Seconds the daemon may hold one ``/runs/{name}/wait`` request open.
RUN_WAIT_TIMEOUT_S = 30
_ENDED_RUN_STATUSES = frozenset({"done", "failed", "stopped"})


class _Cli(click.Group):
    """The root group; it exits with the code a command returns.

    It also turns expected errors into one line on stderr and their exit code.
    """

    def invoke(self, ctx: click.Context) -> Any:
        try:
            result = super().invoke(ctx)
        except ClientError as exc:
            click.echo(f"error: {exc}", err=True)
            ctx.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("", err=True)
            ctx.exit(exit_codes.INTERRUPTED)

        # click ignores a command's return value when it runs as a script.
        if isinstance(result, int) and result != exit_codes.OK:
            ctx.exit(result)

        return result


@click.group(cls=_Cli, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--socket",
    "socket_path",
    metavar="PATH",
    help="The daemon's socket [default: $DSTACKD_SOCKET, else "
    "/run/dstackd/dstackd.sock as root, else $XDG_RUNTIME_DIR/dstackd.sock, "
    "else /tmp/dstackd-<uid>/dstackd.sock when XDG_RUNTIME_DIR is unset or "
    "empty].",
)
@click.pass_context
def cli(ctx: click.Context, socket_path: str | None) -> None:
    """Manage dstackd pools, instances and runs."""
    ctx.obj = Client(socket_path or default_socket_path())


cli.add_command(pool)
cli.add_command(events)
cli.add_command(cost)
cli.add_command(explain)
cli.add_command(apply)
cli.add_command(attach)


@cli.command(context_settings={"allow_interspersed_args": False})
@click.option("--pool", "pool_name", metavar="POOL", help="Pool to run in.")
@resource_options
@click.option(
    "--idle-duration",
    metavar="DURATION",
    help="Idle time before an instance that this run creates is torn down, "
    "e.g. 30m or off [default: the daemon's 5m].",
)
@click.option(
    "--reuse", is_flag=True, help="Only use an idle instance; never provision."
)
@click.option("--instance", metavar="NAME", help="Run on this instance (name or id).")
@click.option(
    "-e",
    "--env",
    multiple=True,
    callback=parse_env,
    metavar="KEY[=VALUE]",
    help="Set an environment variable; KEY alone passes on its value from here.",
)
@click.option("--name", help="Name of the run [default: generated].")
@click.option("-d", "--detach", is_flag=True, help="Print the run name and exit.")
@click.option(
    "--max-duration", metavar="DURATION", help="Stop the run after this long, e.g. 2h."
)
@click.option(
    "-w",
    "--working-dir",
    metavar="DIR",
    help="Working directory of the command [default: the current directory].",
)
@file_option
@profile_option
@click.argument("command", nargs=-1)
@click.pass_obj
def run(
    client: Client,
    /,
    config_path: str | None,
    profile: str | None,
    pool_name: str | None,
    idle_duration: str | None,
    reuse: bool,
    instance: str | None,
    env: dict[str, str],
    name: str | None,
    detach: bool,
    max_duration: str | None,
    working_dir: str | None,
    command: tuple[str, ...],
    **resource_params: Any,
) -> int:
    """Run COMMAND as a task, or the run that -f FILE describes, and stream
    its output.

    Options go before COMMAND; put -- before COMMAND when it starts with a dash.
    With -f, COMMAND is optional and replaces the file's commands. Without -d,
    the exit code is the task's.
    """
    if not command and config_path is None:
        raise click.UsageError("give COMMAND, or a run configuration with -f FILE")

    if working_dir is None and config_path is None:
        working_dir = os.getcwd()

    body = {
        "argv": list(command),
        "name": name,
        "pool": pool_name,
        "resources": resource_args(resource_params),
        "env": env,
        "working_dir": None if working_dir is None else os.path.abspath(working_dir),
        "idle_duration": idle_duration,
        "max_duration": max_duration,
        "reuse": reuse,
        "instance": instance,
        **config_fields(config_path, profile),
    }
    view = client.request("POST", "/v1/runs", body=drop_none(body))
    if detach:
        click.echo(view["name"])
        return exit_codes.OK

    return _follow_run(client, view["name"])


def _follow_run(client: Client, name: str) -> int:
    """Stream a run's output until it ends and return the task's exit code."""
    try:
        _copy_logs(client, name, follow=True)
        view = _wait_for_run_end(client, name)
    except DaemonUnreachableError as exc:
        # The daemon stopped or restarted. The run itself is not stopped.
        click.echo(f"error: {exc}", err=True)
        click.echo(
            f"Run {name} keeps running without this client. Once dstackd is "
            f"back, follow it with 'dstackctl logs -f {name}' or check it with "
            "'dstackctl ps'.",
            err=True,
        )
        return exit_codes.UNREACHABLE
    except KeyboardInterrupt:
        click.echo(
            f"\nDetached from run {name}; it keeps running.\n"
            f"Follow its logs with 'dstackctl logs -f {name}' "
            f"or stop it with 'dstackctl stop {name}'.",
            err=True,
        )
        return exit_codes.INTERRUPTED

    if view.get("exit_status") is not None:
        return exit_codes.for_task_exit_status(view["exit_status"])

    reason = view.get("reason") or "no exit status"
    click.echo(f"error: run {name} {view['status']}: {reason}", err=True)

    return exit_codes.FAILED


def _copy_logs(client: Client, name: str, follow: bool) -> None:
    stdout = sys.stdout.buffer
    query = {"follow": True if follow else None}
    path = api_path("runs", name, "logs")
    timeout = None if follow else DEFAULT_TIMEOUT_S
    with client.open("GET", path, query=query, timeout=timeout) as response:
        for chunk in response.iter_chunks():
            stdout.write(chunk)
            stdout.flush()


def _wait_for_run_end(client: Client, name: str) -> dict[str, Any]:
    """Return the run's view once it has ended; each request waits on the daemon."""
    path = api_path("runs", name, "wait")
    query = {"timeout": RUN_WAIT_TIMEOUT_S}
    while True:
        view: dict[str, Any] = client.request(
            "GET", path, query=query, timeout=RUN_WAIT_TIMEOUT_S * 2
        )
        if view.get("ended_at") is not None or view["status"] in _ENDED_RUN_STATUSES:
            return view


@cli.command()
@click.option("-a", "--all", "show_all", is_flag=True, help="Include finished runs.")
@click.option("--watch", is_flag=True, help="Refresh the table every second.")
@json_option
@click.pass_obj
def ps(client: Client, show_all: bool, watch: bool, as_json: bool) -> int:
    """List the runs."""
    if watch and as_json:
        raise click.UsageError("--watch and --json can not be combined")

    query = {"all": True if show_all else None}
    if as_json:
        terminal.echo_json(client.request("GET", "/v1/runs", query=query))
        return exit_codes.OK

    def render() -> str:
        runs = client.request("GET", "/v1/runs", query=query)
        return tables.runs_table(runs, datetime.now(UTC))

    if watch:
        return terminal.watch(render, "dstackctl ps")

    click.echo(render())

    return exit_codes.OK


@cli.command()
@click.option("-f", "--follow", is_flag=True, help="Keep printing until the run ends.")
@click.argument("run_name", metavar="RUN")
@click.pass_obj
def logs(client: Client, follow: bool, run_name: str) -> int:
    """Print the output of RUN (a name or id)."""
    # Ctrl-C is the normal way to stop following, not a failure.
    with contextlib.suppress(KeyboardInterrupt):
        _copy_logs(client, run_name, follow=follow)

    return exit_codes.OK


@cli.command()
@click.option("--abort", is_flag=True, help="Kill at once instead of a graceful stop.")
@click.argument("run_names", metavar="RUN...", nargs=-1, required=True)
@click.pass_obj
def stop(client: Client, abort: bool, run_names: tuple[str, ...]) -> int:
    """Stop runs, given by name or id.

    Every run is tried; the exit code is that of the first failure.
    """
    exit_code = exit_codes.OK
    for name in run_names:
        path = api_path("runs", name, "stop")
        try:
            view = client.request("POST", path, body={"abort": abort})
        except DaemonUnreachableError:
            raise
        except ClientError as exc:
            click.echo(f"error: {exc}", err=True)
            exit_code = exit_code or exc.exit_code
            continue

        click.echo(f"Stopping run {view['name']} ({view['status']}).")

    return exit_code


@cli.command()
@click.option("--pool", "pool_name", metavar="POOL", help="Pool whose backends to ask.")
@resource_options
@click.option(
    "--max-offers",
    type=click.IntRange(min=1),
    help="Number of offers to show [default: all].",
)
@json_option
@click.pass_obj
def offer(
    client: Client,
    /,
    pool_name: str | None,
    max_offers: int | None,
    as_json: bool,
    **resource_params: Any,
) -> None:
    """List the offers that fit the requirements, cheapest first."""
    resources = resource_args(resource_params)
    body = {"pool": pool_name, "resources": resources, "max_offers": max_offers}
    offers = client.request("POST", "/v1/offers", body=drop_none(body))
    if as_json:
        terminal.echo_json(offers)
    elif offers:
        click.echo(tables.offers_table(offers))
    else:
        click.echo(f"No offers match {describe_resource_args(resources)}.", err=True)


def main() -> None:
    """Run dstackctl with ``sys.argv``; exits the process with its exit code."""
    cli.main(prog_name="dstackctl")
