"""Run configuration files and profiles on the client side, and ``dstackctl apply``.

dstackctl does not parse YAML: it sends the text of the file given with ``-f``
and of the profiles files it finds, with their absolute paths, and the daemon
parses them with the grammar every entry point uses. Errors come back naming
the file, the field path and the line. Profiles files are looked up in this
order, and a profile name found in both is taken from the first:

1. ``.dstack/profiles.yml`` in the current directory,
2. ``~/.dstack/profiles.yml``.
"""

import os
from typing import Any

import click

from dstackctl.options import parse_env, resource_options

PROFILES_FILES = (
    os.path.join(".dstack", "profiles.yml"),
    os.path.join("~", ".dstack", "profiles.yml"),
)
# Larger files are rejected before they are sent; real ones are a few KB.
MAX_FILE_BYTES = 1024 * 1024


def read_source(path: str) -> dict[str, str]:
    """Read a YAML file for the daemon: its absolute path and its text.

    Raises:
        click.BadParameter: the file cannot be read, is too large or is not
            UTF-8.
    """
    absolute = os.path.abspath(os.path.expanduser(path))
    try:
        with open(absolute, "rb") as file:
            data = file.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise click.BadParameter(f"cannot read {path}: {exc.strerror or exc}") from None

    if len(data) > MAX_FILE_BYTES:
        raise click.BadParameter(f"{path} is larger than {MAX_FILE_BYTES} bytes")

    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise click.BadParameter(f"{path} is not UTF-8: {exc}") from None

    return {"path": absolute, "text": text}


def find_profiles_files(cwd: str | None = None) -> list[str]:
    """Return the profiles files that exist, in precedence order."""
    found: list[str] = []
    for candidate in PROFILES_FILES:
        path = os.path.expanduser(candidate)
        if not os.path.isabs(path):
            path = os.path.join(cwd or os.getcwd(), path)

        real = os.path.realpath(path)
        if os.path.isfile(real) and real not in found:
            found.append(real)

    return found


def config_fields(config_path: str | None, profile: str | None) -> dict[str, Any]:
    """Build the ``SubmitRun`` fields that carry the run file and the profiles."""
    fields: dict[str, Any] = {
        "profiles": [read_source(path) for path in find_profiles_files()]
    }
    if config_path is not None:
        fields["config"] = read_source(config_path)

    if profile is not None:
        fields["profile"] = profile

    if not fields["profiles"]:
        del fields["profiles"]

    return fields


file_option = click.option(
    "-f",
    "--file",
    "config_path",
    metavar="FILE",
    help="Run configuration file (YAML) with type task, service or "
    "dev-environment; options given here override it.",
)
profile_option = click.option(
    "--profile",
    metavar="NAME",
    help="Profile from .dstack/profiles.yml here or ~/.dstack/profiles.yml "
    "[default: the profile marked default: true].",
)


@click.command(context_settings={"allow_interspersed_args": False})
@click.option(
    "-f",
    "--file",
    "config_path",
    metavar="FILE",
    required=True,
    help="Run configuration file (YAML) with type task, service or dev-environment.",
)
@profile_option
@click.option("--pool", "pool_name", metavar="POOL", help="Pool to run in.")
@resource_options
@click.option(
    "--idle-duration",
    metavar="DURATION",
    help="Idle time before an instance that this run creates is torn down.",
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
@click.option(
    "--name", help="Name of the run [default: the file's name, else generated]."
)
@click.option("-d", "--detach", is_flag=True, help="Print the run name and exit.")
@click.option(
    "--max-duration", metavar="DURATION", help="Stop the run after this long."
)
@click.option(
    "-w",
    "--working-dir",
    metavar="DIR",
    help="Working directory [default: the file's working_dir, relative to the "
    "file's directory].",
)
@click.pass_context
def apply(ctx: click.Context, /, **params: Any) -> Any:
    """Submit the run that the configuration FILE describes.

    Same as 'dstackctl run -f FILE': without -d it streams the run's output.
    A service or dev environment runs until stopped; detach with Ctrl-C.
    """
    assert ctx.parent is not None
    run = ctx.parent.command.get_command(ctx.parent, "run")  # type: ignore[attr-defined]
    assert run is not None

    return ctx.invoke(run, command=(), **params)
