"""The ``dstackctl pool`` commands: pools and the instances in them."""

import os
import time
from datetime import UTC, datetime
from typing import Any

import click

from dstackctl import exit_codes, tables, terminal
from dstackctl.client import Client, ClientError, DaemonUnreachableError, api_path
from dstackctl.options import (
    describe_resource_args,
    drop_none,
    resource_args,
    resource_options,
)

# How often ``pool add`` checks an instance that is still provisioning.
PROVISIONING_POLL_INTERVAL_S = 1.0

json_option = click.option(
    "--json", "as_json", is_flag=True, help="Print the daemon's JSON for scripts."
)


@click.group()
def pool() -> None:
    """Manage pools and the instances in them."""


@pool.command("list")
@json_option
@click.pass_obj
def list_pools(client: Client, as_json: bool) -> None:
    """List the pools."""
    pools = client.request("GET", "/v1/pools")
    if as_json:
        terminal.echo_json(pools)
    else:
        click.echo(tables.pools_table(pools))


@pool.command()
@click.argument("name")
@click.pass_obj
def create(client: Client, name: str) -> None:
    """Create the pool NAME."""
    view = client.request("POST", "/v1/pools", body={"name": name})
    click.echo(f"Created pool {view['name']}.")


@pool.command()
@click.argument("name")
@click.option("--force", is_flag=True, help="Delete the pool even if it has instances.")
@click.pass_obj
def delete(client: Client, name: str, force: bool) -> None:
    """Delete the pool NAME."""
    query = {"force": True if force else None}
    view = client.request("DELETE", api_path("pools", name), query=query)
    click.echo(f"Deleted pool {view['name']}.")


@pool.command("set-default")
@click.argument("name")
@click.pass_obj
def set_default(client: Client, name: str) -> None:
    """Make NAME the pool that commands use when they are given no --pool."""
    view = client.request("POST", api_path("pools", name, "default"))
    click.echo(f"The default pool is now {view['name']}.")


@pool.command()
@click.option("--pool", "pool_name", metavar="POOL", help="Show only this pool.")
@click.option(
    "-a", "--all", "show_all", is_flag=True, help="Include terminated instances."
)
@click.option("--watch", is_flag=True, help="Refresh the table every second.")
@json_option
@click.pass_obj
def ps(
    client: Client, pool_name: str | None, show_all: bool, watch: bool, as_json: bool
) -> int:
    """List the instances of the pools, with what they run and their idle time."""
    if watch and as_json:
        raise click.UsageError("--watch and --json can not be combined")

    query = {"pool": pool_name, "all": True if show_all else None}

    def fetch() -> list[dict[str, Any]]:
        instances: list[dict[str, Any]] = client.request(
            "GET", "/v1/instances", query=query
        )
        return instances

    if as_json:
        terminal.echo_json(fetch())
        return exit_codes.OK

    def render() -> str:
        return tables.instances_table(fetch(), datetime.now(UTC))

    if watch:
        return terminal.watch(render, "dstackctl pool ps")

    click.echo(render())

    return exit_codes.OK


@pool.command()
@click.option("--pool", "pool_name", metavar="POOL", help="Pool to add to.")
@resource_options
@click.option(
    "--idle-duration",
    metavar="DURATION",
    help="Idle time before the instance is torn down, e.g. 30m or off "
    "[default: the daemon's 72h].",
)
@click.option("--name", help="Name of the new instance [default: generated].")
@click.option(
    "--max-offers",
    type=click.IntRange(min=1),
    default=3,
    show_default=True,
    help="Number of offers to show.",
)
@click.option("-y", "--yes", is_flag=True, help="Add without asking to confirm.")
@click.option(
    "--ssh",
    "ssh_hosts",
    multiple=True,
    metavar="USER@HOST[:PORT]",
    help="Add this host over SSH instead of an offer; repeat for several hosts.",
)
@click.option(
    "-i",
    "--identity-file",
    type=click.Path(exists=True, dir_okay=False),
    help="Private key for --ssh hosts [default: the daemon user's keys].",
)
@click.pass_obj
def add(
    client: Client,
    /,
    pool_name: str | None,
    idle_duration: str | None,
    name: str | None,
    max_offers: int,
    yes: bool,
    ssh_hosts: tuple[str, ...],
    identity_file: str | None,
    **resource_params: Any,
) -> int:
    """Add an instance to a pool from the cheapest offer that fits.

    With --ssh, add hosts you already have instead: the daemon connects to
    each, detects its CPUs, memory, disk and GPUs, and adds it with an idle
    duration of off unless --idle-duration is given.
    """
    if ssh_hosts:
        return _add_ssh_hosts(
            client, ssh_hosts, identity_file, pool_name, idle_duration, name
        )

    if identity_file is not None:
        raise click.UsageError("-i/--identity-file applies only with --ssh")

    resources = resource_args(resource_params)
    offers = client.request(
        "POST",
        "/v1/offers",
        body=drop_none(
            {"pool": pool_name, "resources": resources, "max_offers": max_offers}
        ),
    )
    if not offers:
        where = f" in pool {pool_name}" if pool_name else ""
        click.echo(
            f"error: no offers match {describe_resource_args(resources)}{where}; "
            "relax the requirements or enable another backend",
            err=True,
        )
        return exit_codes.FAILED

    click.echo(tables.offers_table(offers))
    if not yes and not click.confirm("Continue?", default=None):
        click.echo("No instance was added.", err=True)
        return exit_codes.FAILED

    offer = offers[0]
    body = {
        "pool": pool_name,
        "resources": resources,
        "idle_duration": idle_duration,
        "name": name,
        "offer": offer["offer"],
    }
    message = f"Provisioning {offer['instance_type']} on {offer['backend']}..."
    try:
        with terminal.Spinner(message) as spinner:
            # The daemon may respond only when the instance is ready.
            instance = client.request(
                "POST", "/v1/instances", body=drop_none(body), timeout=None
            )
            spinner.message = f"Provisioning {instance['name']}..."
            instance = _wait_while_provisioning(client, instance)
    except KeyboardInterrupt:
        click.echo(
            "\nStopped waiting; the daemon keeps provisioning the instance. "
            "Check it with 'dstackctl pool ps'.",
            err=True,
        )
        return exit_codes.INTERRUPTED

    click.echo(tables.instances_table([instance], datetime.now(UTC)))
    if instance["status"] == "failed":
        reason = instance.get("reason") or "no reason given"
        click.echo(f"error: instance {instance['name']} failed: {reason}", err=True)
        return exit_codes.FAILED

    return exit_codes.OK


def _add_ssh_hosts(
    client: Client,
    hosts: tuple[str, ...],
    identity_file: str | None,
    pool_name: str | None,
    idle_duration: str | None,
    name: str | None,
) -> int:
    body = {
        "hosts": list(hosts),
        "identity_file": os.path.abspath(identity_file) if identity_file else None,
        "pool": pool_name,
        "idle_duration": idle_duration,
        "name": name,
    }
    noun = "host" if len(hosts) == 1 else "hosts"
    with terminal.Spinner(f"Connecting to {len(hosts)} {noun}..."):
        # The daemon connects to every host before it responds.
        instances = client.request(
            "POST", "/v1/instances/ssh", body=drop_none(body), timeout=None
        )

    click.echo(tables.instances_table(instances, datetime.now(UTC)))

    return exit_codes.OK


def _wait_while_provisioning(client: Client, instance: dict[str, Any]) -> Any:
    """Poll the daemon until the instance leaves the provisioning state."""
    while instance["status"] == "provisioning":
        time.sleep(PROVISIONING_POLL_INTERVAL_S)
        query = {"pool": instance["pool"], "all": True}
        instances = client.request("GET", "/v1/instances", query=query)
        matches = [item for item in instances if item["id"] == instance["id"]]
        if not matches:
            raise ClientError(
                f"instance {instance['name']} is no longer listed in pool "
                f"{instance['pool']}"
            )

        instance = matches[0]

    return instance


@pool.command()
@click.argument("names", metavar="NAME...", nargs=-1, required=True)
@click.option("--force", is_flag=True, help="Remove an instance even while it runs.")
@click.pass_obj
def remove(client: Client, names: tuple[str, ...], force: bool) -> int:
    """Remove instances, given by name or id, from their pools.

    Every instance is tried; the exit code is that of the first failure.
    """
    exit_code = exit_codes.OK
    query = {"force": True if force else None}
    for name in names:
        try:
            view = client.request("DELETE", api_path("instances", name), query=query)
        except DaemonUnreachableError:
            raise
        except ClientError as exc:
            click.echo(f"error: {exc}", err=True)
            exit_code = exit_code or exc.exit_code
            continue

        click.echo(f"Removing instance {view['name']} ({view['status']}).")

    return exit_code
