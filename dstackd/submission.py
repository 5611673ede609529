"""Run submissions: merging flags, a run configuration file and a profile into
one ``SubmitRun``, and building the ``RunSpec`` that the log records.

Precedence, highest first: fields of the request itself (dstackctl's flags),
the run configuration file, the chosen profile, then the defaults of
``RunSpec``. Environment variables merge name by name, and so do resources.
"""

import os

import msgspec

from dstackd import api
from dstackd.errors import InvalidRequestError, NotFoundError
from dstackd.run_config import (
    ENV_NAME_RE,
    Profile,
    RunConfig,
    RunConfigError,
    parse_profiles,
    parse_run_config,
)
from events.event_types import ReadinessProbe, RetryPolicy, RunSpec
from events.grammar import build_requirements, parse_duration
from events.model import Duration, Requirements

# How often a service is restarted in place when its file sets no max_restarts.
DEFAULT_SERVICE_MAX_RESTARTS = 3

PROFILES_LOCATIONS = (
    ".dstack/profiles.yml in the working directory, ~/.dstack/profiles.yml"
)

_SERVICE_ONLY = ("port", "probe", "max_restarts")
_DEV_ENVIRONMENT_ONLY = ("init", "inactivity_duration")


def resolve_request(request: api.SubmitRun) -> api.SubmitRun:
    """Merge the request over its run configuration file and profile.

    The result has no ``config``, ``profiles`` or ``profile``; a request
    without them comes back unchanged.

    Raises:
        RunConfigError: a file is invalid, or a variable the file lists without
            a value was not given with ``-e``.
        NotFoundError: ``profile`` names no profile in the files sent.
    """
    if request.config is None and not request.profiles:
        if request.profile is not None:
            raise NotFoundError(
                "profile",
                request.profile,
                "no profiles.yml was found in .dstack/ of the working directory "
                "or in ~/.dstack/",
            )

        return request

    merged = api.SubmitRun()
    profile = select_profile(request)
    if profile is not None:
        merged = _merge(merged, profile.request)

    run_type = request.type
    config: RunConfig | None = None
    if request.config is not None:
        config = parse_run_config(request.config.path, request.config.text)
        run_type = config.type
        merged = _merge(merged, config.request)
        _check_bare_env(config, request)

    flags = _without_sources(request)
    merged = _merge(merged, flags)
    working_dir = merged.working_dir
    if config is not None:
        base_dir = os.path.dirname(config.path)
        if flags.working_dir is None:
            working_dir = os.path.join(base_dir, config.request.working_dir or "")

    return _replace(merged, type=run_type, working_dir=working_dir)


def select_profile(request: api.SubmitRun) -> Profile | None:
    """Return the profile named by ``request.profile``, else the default one.

    Files come in precedence order: a name found in several files, and a
    default marked in several, are taken from the first file.
    """
    profiles: list[Profile] = []
    for source in request.profiles:
        profiles.extend(parse_profiles(source.path, source.text))

    if request.profile is not None:
        for profile in profiles:
            if profile.name == request.profile:
                return profile

        names = ", ".join(sorted({profile.name for profile in profiles})) or "none"
        files = ", ".join(source.path for source in request.profiles)
        hint = (
            f"profiles found: {names} (in {files})"
            if files
            else f"no profiles file was found; dstackctl reads {PROFILES_LOCATIONS}"
        )
        raise NotFoundError("profile", request.profile, hint)

    return next((profile for profile in profiles if profile.default), None)


def _check_bare_env(config: RunConfig, request: api.SubmitRun) -> None:
    for name, line in config.bare_env.items():
        if name not in request.env:
            raise RunConfigError(
                config.path,
                f"env.{name}",
                line,
                f"{name} has no value in the file; pass it with -e {name} "
                f"(its value is then taken from your environment) or -e {name}=VALUE",
            )


def _without_sources(request: api.SubmitRun) -> api.SubmitRun:
    return _replace(request, config=None, profiles=[], profile=None)


def _replace(request: api.SubmitRun, **changes: object) -> api.SubmitRun:
    return msgspec.structs.replace(request, **changes)


def _merge(lower: api.SubmitRun, upper: api.SubmitRun) -> api.SubmitRun:
    """Return ``lower`` with every field that ``upper`` sets taken from ``upper``."""
    has_command = bool(upper.argv or upper.commands)
    resources = _merge_resources(lower.resources, upper.resources)
    probe = lower.probe
    if upper.probe is not None:
        probe = _merge_probe(lower.probe, upper.probe)

    changes: dict[str, object] = {
        "argv": upper.argv if has_command else lower.argv,
        "commands": upper.commands if has_command else lower.commands,
        "type": upper.type if upper.type != "task" else lower.type,
        "resources": resources,
        "env": {**lower.env, **upper.env},
        "reuse": lower.reuse or upper.reuse,
        "ports": upper.ports or lower.ports,
        "init": upper.init or lower.init,
        "probe": probe,
    }
    for name in (
        "name",
        "pool",
        "working_dir",
        "idle_duration",
        "max_duration",
        "instance",
        "creation_policy",
        "port",
        "max_restarts",
        "retry",
        "inactivity_duration",
    ):
        value = getattr(upper, name)
        changes[name] = getattr(lower, name) if value is None else value

    return _replace(lower, **changes)


def _merge_resources(
    lower: api.ResourceArgs, upper: api.ResourceArgs
) -> api.ResourceArgs:
    changes = {
        name: getattr(upper, name)
        for name in api.ResourceArgs.__struct_fields__
        if getattr(upper, name) is not None
    }

    return msgspec.structs.replace(lower, **changes)


def _merge_probe(lower: api.ProbeArgs | None, upper: api.ProbeArgs) -> api.ProbeArgs:
    if lower is None:
        return upper

    return api.ProbeArgs(
        path=upper.path or lower.path,
        interval=upper.interval or lower.interval,
        timeout=upper.timeout or lower.timeout,
    )


# The RunSpec


# Limit on the bytes of a run's argv, commands and init lines together. They
# are stored in the event log for good, and Linux rejects an argv much larger.
MAX_COMMAND_BYTES = 128 * 1024


def _check_command_text(request: api.SubmitRun) -> None:
    """Reject text no process can take: NUL bytes, relative or oversized paths."""
    fields = {
        "argv": list(request.argv),
        "commands": list(request.commands),
        "init": list(request.init),
        "env": [*request.env, *request.env.values()],
        "working_dir": [request.working_dir or ""],
    }
    for field, values in fields.items():
        for value in values:
            if "\0" in value:
                raise InvalidRequestError(
                    f"invalid {field} {value!r}: it contains a NUL byte, which no "
                    "process argument, variable or path can hold"
                )

    size = sum(len(text.encode()) for text in [*request.argv, *request.commands, *request.init])
    if size > MAX_COMMAND_BYTES:
        raise InvalidRequestError(
            f"the run's command is {size} bytes, more than the {MAX_COMMAND_BYTES} "
            "allowed; put long scripts in a file and run that"
        )

    working_dir = request.working_dir
    if working_dir is not None and not working_dir.startswith("/"):
        raise InvalidRequestError(
            f"invalid working directory {working_dir!r}: expected an absolute path"
        )


def build_run_spec(request: api.SubmitRun) -> RunSpec:
    """Check a resolved request and build its ``RunSpec``.

    Raises:
        InvalidRequestError: a field is invalid, missing, or does not apply to
            the run's type.
        InvalidValueError: a value does not follow its grammar.
    """
    run_type = _check_type(request)
    _check_env_names(request.env)
    _check_command_text(request)
    port = request.port
    if run_type == "service" and port is None:
        raise InvalidRequestError("a service needs a port: set port in its file")

    max_restarts = request.max_restarts
    if run_type == "service" and max_restarts is None:
        max_restarts = DEFAULT_SERVICE_MAX_RESTARTS

    for value in [*request.ports, *([] if port is None else [port])]:
        if not 1 <= value <= 65535:
            raise InvalidRequestError(
                f"invalid port {value}: expected a number from 1 to 65535"
            )

    return RunSpec(
        type=run_type,  # type: ignore[arg-type]
        argv=tuple(request.argv),
        commands=tuple(request.commands),
        env_names=tuple(sorted(request.env)),
        working_dir=request.working_dir,
        requirements=_requirements(request.resources),
        creation_policy=_creation_policy(request),
        instance=request.instance,
        idle_duration=_optional_duration(request.idle_duration, "idle duration"),
        max_duration=_optional_duration(request.max_duration, "max duration"),
        ports=tuple(request.ports),
        port=port,
        probe=_probe(request.probe) if run_type == "service" else None,
        max_restarts=max_restarts or 0,
        retry=_retry(request.retry),
        init=tuple(request.init),
        inactivity_duration=_optional_duration(
            request.inactivity_duration, "inactivity duration"
        ),
    )


def _check_type(request: api.SubmitRun) -> str:
    run_type = request.type
    if run_type not in ("task", "service", "dev-environment"):
        raise InvalidRequestError(
            f"invalid run type {run_type!r}: expected task, service or dev-environment"
        )

    if run_type == "dev-environment":
        if request.argv or request.commands:
            raise InvalidRequestError(
                "a dev environment runs no command: put setup lines in init, "
                "and run commands with 'dstackctl attach'"
            )
    elif bool(request.argv) == bool(request.commands):
        raise InvalidRequestError("give either argv or commands, and not both")

    _check_applies(request, run_type, "service", _SERVICE_ONLY)
    _check_applies(request, run_type, "dev-environment", _DEV_ENVIRONMENT_ONLY)
    if run_type == "service" and request.ports:
        raise InvalidRequestError("a service listens on port; ports is for other runs")

    return run_type


def _check_applies(
    request: api.SubmitRun, run_type: str, owner: str, fields: tuple[str, ...]
) -> None:
    if run_type == owner:
        return

    for name in fields:
        if getattr(request, name) not in (None, [], ()):
            raise InvalidRequestError(
                f"{name} applies to type {owner}, not to {run_type}"
            )


def _check_env_names(env: dict[str, str]) -> None:
    for key in env:
        if not ENV_NAME_RE.fullmatch(key):
            raise InvalidRequestError(
                f"invalid environment variable name {key!r}: expected letters, "
                "digits and '_', not starting with a digit"
            )


def _requirements(args: api.ResourceArgs) -> Requirements:
    return build_requirements(
        cpu=args.cpu,
        memory=args.memory,
        disk=args.disk,
        gpu=args.gpu,
        spot_policy=args.spot_policy,
        max_price=args.max_price,
        backends=tuple(args.backends) if args.backends is not None else None,
    )


def _creation_policy(request: api.SubmitRun) -> str:
    if request.reuse:
        return "reuse"

    policy = request.creation_policy or "reuse-or-create"
    if policy not in ("reuse", "reuse-or-create"):
        raise InvalidRequestError(
            f"invalid creation policy {policy!r}: expected reuse or reuse-or-create"
        )

    return policy


def _optional_duration(text: str | None, field: str) -> Duration | None:
    return None if text is None else parse_duration(text, field)


def _probe(args: api.ProbeArgs | None) -> ReadinessProbe:
    defaults = ReadinessProbe()
    if args is None:
        return defaults

    interval = _probe_seconds(args.interval, "probe interval", defaults.interval)
    timeout = _probe_seconds(args.timeout, "probe timeout", defaults.timeout)
    path = args.path or defaults.path
    if not path.startswith("/"):
        raise InvalidRequestError(
            f"invalid probe path {path!r}: expected a path starting with /"
        )

    return ReadinessProbe(path=path, interval=interval, timeout=timeout)


def _probe_seconds(text: str | None, field: str, default: int) -> int:
    if text is None:
        return default

    seconds = parse_duration(text, field)
    if seconds == "off" or seconds < 1:
        raise InvalidRequestError(f"invalid {field} {text!r}: expected at least 1s")

    return seconds


def _retry(args: api.RetryArgs | None) -> RetryPolicy | None:
    if args is None:
        return None

    defaults = RetryPolicy()
    on_events = defaults.on_events if args.on_events is None else tuple(args.on_events)
    if not on_events:
        return None

    for event in on_events:
        if event not in ("no-capacity", "error", "interruption"):
            raise InvalidRequestError(
                f"invalid retry event {event!r}: expected no-capacity, error or "
                "interruption"
            )

    duration = defaults.duration
    if args.duration is not None:
        duration = parse_duration(args.duration, "retry duration")

    return RetryPolicy(on_events=on_events, duration=duration)  # type: ignore[arg-type]
