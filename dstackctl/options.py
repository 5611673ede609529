"""Options that several dstackctl commands share, and their conversion to API fields.

Resource values stay in their text forms: the daemon parses them with the one
grammar every entry point uses and rejects an invalid value with HTTP 400, which
dstackctl reports with exit code 2.
"""

import os
import re
from collections.abc import Callable
from typing import Any, TypeVar

import click

F = TypeVar("F", bound=Callable[..., Any])

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

# Flag name -> the spot_policy value it sets.
_SPOT_FLAGS = {"spot": "spot", "on_demand": "on-demand", "spot_auto": "auto"}
_RESOURCE_TEXT_FIELDS = ("cpu", "memory", "disk", "gpu", "max_price")

_RESOURCE_OPTIONS = [
    click.option("--cpu", metavar="RANGE", help="Number of CPUs, e.g. 4 or 2..8."),
    click.option(
        "--memory", metavar="RANGE", help="Memory in GB, e.g. 16GB or 8GB..64GB."
    ),
    click.option("--disk", metavar="RANGE", help="Disk size in GB, e.g. 100GB.."),
    click.option(
        "--gpu",
        metavar="SPEC",
        help="GPUs as name, memory and count, e.g. A100, 24GB.. or A100:80GB:2.",
    ),
    click.option(
        "--backend",
        "backends",
        multiple=True,
        metavar="NAME",
        help="Only use this backend; repeat the option for several.",
    ),
    click.option("--spot", is_flag=True, help="Use spot instances only."),
    click.option("--on-demand", is_flag=True, help="Use on-demand instances only."),
    click.option(
        "--spot-auto", is_flag=True, help="Use spot instances, else on-demand ones."
    ),
    click.option("--max-price", metavar="USD", help="Maximum price per hour, in USD."),
]


def resource_options(command: F) -> F:
    """Add the resource options; the command reads them back with ``resource_args``."""
    for option in reversed(_RESOURCE_OPTIONS):
        command = option(command)

    return command


def resource_args(params: dict[str, Any]) -> dict[str, Any]:
    """Build the API's ``ResourceArgs`` object from the values of the resource options.

    Only options that were given appear in the result.

    Raises:
        click.UsageError: more than one of --spot, --on-demand and --spot-auto.
    """
    args: dict[str, Any] = {
        name: params[name] for name in _RESOURCE_TEXT_FIELDS if params.get(name)
    }
    if params.get("backends"):
        args["backends"] = list(params["backends"])

    policies = [policy for flag, policy in _SPOT_FLAGS.items() if params.get(flag)]
    if len(policies) > 1:
        raise click.UsageError(
            "--spot, --on-demand and --spot-auto are mutually exclusive; pass one"
        )

    if policies:
        args["spot_policy"] = policies[0]

    return args


def describe_resource_args(args: dict[str, Any]) -> str:
    """Describe resource arguments for a message, e.g. ``cpu=4 gpu=A100``."""
    if not args:
        return "the default requirements"

    parts = []
    for name, value in args.items():
        text = ",".join(value) if isinstance(value, list) else str(value)
        parts.append(f"{name}={text}")

    return " ".join(parts)


def parse_env(
    ctx: click.Context, param: click.Parameter, values: tuple[str, ...]
) -> dict[str, str]:
    """Parse ``-e KEY=VALUE`` options; ``-e KEY`` takes the value from this process.

    Raises:
        click.BadParameter: an invalid name, or a bare KEY that is not set here.
    """
    env: dict[str, str] = {}
    for item in values:
        name, equals, value = item.partition("=")
        if not _ENV_NAME.fullmatch(name):
            raise click.BadParameter(
                f"{item!r}: expected KEY=VALUE or KEY, where KEY is letters, digits "
                "and underscores and does not start with a digit"
            )

        if not equals:
            if name not in os.environ:
                raise click.BadParameter(
                    f"{item!r}: {name} is not set in this environment; "
                    f"pass {name}=VALUE"
                )

            value = os.environ[name]

        env[name] = value

    return env


def drop_none(fields: dict[str, Any]) -> dict[str, Any]:
    """Return ``fields`` without the ``None`` values, so the daemon's defaults apply."""
    return {name: value for name, value in fields.items() if value is not None}
