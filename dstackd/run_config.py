"""Run configuration files and profiles files: YAML read with line numbers.

dstackctl sends the text of a run configuration (``dstackctl apply -f FILE``)
and of the profiles files it found, and this module turns each into a partial
``SubmitRun``: the fields the file sets, in the same text forms as the flags.
Every value goes through the parser of ``events.grammar`` while its YAML node
is at hand, so an error names the file, the field path, the line and the
accepted forms, e.g. ``/src/.dstack.yml:7: resources.gpu: invalid gpu ...``.

Fields that dstack users know but dstackd cannot honour (``image``, since runs
are processes and not containers) are rejected with the reason, and unknown
fields are rejected with the list of known ones.
"""

import re
from collections.abc import Callable, Iterator

import msgspec
import yaml

from dstackd import api
from dstackd.errors import InvalidRequestError
from events.errors import InvalidValueError
from events.grammar import (
    parse_backends,
    parse_duration,
    parse_gpu,
    parse_price,
    parse_range,
    parse_spot_policy,
)

RUN_TYPES = ("task", "service", "dev-environment")
CREATION_POLICIES = ("reuse", "reuse-or-create")
RETRY_EVENTS = ("no-capacity", "error", "interruption")

_COMMON_FIELDS = (
    "type",
    "name",
    "env",
    "working_dir",
    "resources",
    "backends",
    "spot_policy",
    "max_price",
    "idle_duration",
    "creation_policy",
    "pool",
    "retry",
    "max_duration",
)
RUN_FIELDS = {
    "task": (*_COMMON_FIELDS, "commands", "ports"),
    "service": (*_COMMON_FIELDS, "commands", "port", "probe", "max_restarts"),
    "dev-environment": (*_COMMON_FIELDS, "init", "ports", "inactivity_duration"),
}
PROFILE_FIELDS = (
    "name",
    "default",
    "pool",
    "backends",
    "spot_policy",
    "max_price",
    "idle_duration",
    "creation_policy",
    "max_duration",
    "retry",
)
RESOURCE_FIELDS = ("cpu", "memory", "gpu", "disk")
PROBE_FIELDS = ("path", "interval", "timeout")

_NOT_A_CONTAINER = "runs are processes on the instance, not containers"
_NO_GATEWAY = "services are reached on their own port; dstackd has no gateway or proxy"
_NO_PLACEMENT_FILTER = "placement follows resources and backends only"

# Fields of dstack's configurations that dstackd rejects, with the reason.
UNSUPPORTED_FIELDS = {
    "image": _NOT_A_CONTAINER,
    "docker": _NOT_A_CONTAINER,
    "registry_auth": _NOT_A_CONTAINER,
    "privileged": _NOT_A_CONTAINER,
    "entrypoint": f"{_NOT_A_CONTAINER}; put the command in commands",
    "user": "runs execute as the user who submits them",
    "python": "runs use the instance's Python; install what you need in commands",
    "nvcc": "runs use the instance's CUDA toolkit",
    "ide": "dev environments are reached with 'dstackctl attach', which opens a "
    "shell; IDEs are not supported",
    "version": "dev environments have no IDE, so there is no IDE version to set",
    "setup": "put these lines first in commands, or in init for a dev environment",
    "volumes": "dstackd manages no volumes; use paths on the instance",
    "repos": "dstackd copies no repositories; runs see the instance's files",
    "files": "dstackd copies no files; runs see the instance's files",
    "replicas": "a service runs as one process",
    "scaling": "a service runs as one process",
    "gateway": _NO_GATEWAY,
    "https": _NO_GATEWAY,
    "auth": _NO_GATEWAY,
    "model": _NO_GATEWAY,
    "rate_limits": _NO_GATEWAY,
    "regions": _NO_PLACEMENT_FILTER,
    "availability_zones": _NO_PLACEMENT_FILTER,
    "instance_types": _NO_PLACEMENT_FILTER,
    "fleets": "dstackd places runs in pools; use pool",
    "termination_policy": "use idle_duration",
    "termination_idle_time": "use idle_duration",
    "shm_size": "runs are not containers, so there is no /dev/shm size to set",
}

ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_PORT_TEXT_RE = re.compile(r"[0-9]{1,5}")
_MIN_PORT = 1
_MAX_PORT = 65535

_NULL_TAG = "tag:yaml.org,2002:null"
_INT_TAG = "tag:yaml.org,2002:int"
_BOOL_TAG = "tag:yaml.org,2002:bool"
_STR_TAG = "tag:yaml.org,2002:str"


class RunConfigError(InvalidRequestError):
    """A run configuration or profiles file is invalid at a field and line."""

    code = "invalid_value"

    def __init__(self, path: str, field: str, line: int, problem: str) -> None:
        self.path = path
        self.field = field
        self.line = line
        self.problem = problem
        where = f"{path}:{line}: {field}: " if field else f"{path}:{line}: "
        super().__init__(where + problem)


class RunConfig(msgspec.Struct, frozen=True):
    """A parsed run configuration file.

    ``request`` contains the fields the file sets. ``bare_env`` maps variables the
    file lists without a value (they must come from ``-e NAME``) to their line.
    """

    path: str
    type: str
    request: api.SubmitRun
    bare_env: dict[str, int] = {}


class Profile(msgspec.Struct, frozen=True):
    """One entry of a profiles file; ``request`` contains the fields it sets."""

    path: str
    name: str
    default: bool
    request: api.SubmitRun


class _Field(msgspec.Struct, frozen=True):
    """A YAML node with the dotted path that leads to it."""

    node: yaml.Node
    path: str

    @property
    def line(self) -> int:
        return int(self.node.start_mark.line) + 1


class _Reader:
    """Reads typed values from the nodes of one file, raising ``RunConfigError``."""

    def __init__(self, path: str) -> None:
        self.path = path

    def error(self, field: _Field, problem: str) -> RunConfigError:
        return RunConfigError(self.path, field.path, field.line, problem)

    def compose(self, text: str) -> _Field | None:
        """Parse ``text`` into its node tree; None for an empty file."""
        try:
            node = yaml.compose(text, Loader=yaml.SafeLoader)
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            line = 1 if mark is None else mark.line + 1
            raise RunConfigError(
                self.path, "", line, f"invalid YAML: {exc.problem or exc.context}"
            ) from None
        except yaml.YAMLError as exc:
            raise RunConfigError(self.path, "", 1, f"invalid YAML: {exc}") from None
        except RecursionError:
            raise RunConfigError(
                self.path, "", 1, "invalid YAML: values are nested too deeply"
            ) from None

        return None if node is None else _Field(node, "")

    def mapping(
        self,
        field: _Field,
        known: tuple[str, ...],
        what: str = "a mapping",
        run_type: str | None = None,
    ) -> dict[str, _Field]:
        """Return the entries of a mapping node by key, rejecting unknown keys.

        ``run_type`` is the type of the run configuration being read, so that a
        field of another type is reported as such.
        """
        if not isinstance(field.node, yaml.MappingNode):
            raise self.error(field, f"expected {what}, got {_describe(field.node)}")

        entries: dict[str, _Field] = {}
        for key_node, value_node in field.node.value:
            key_field = _Field(key_node, field.path)
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag != _STR_TAG:
                raise self.error(key_field, "expected a field name")

            key = key_node.value
            path = f"{field.path}.{key}" if field.path else key
            located = _Field(key_node, path)
            if key in entries:
                raise self.error(located, "duplicate field")

            if key not in known:
                raise self.error(located, _unknown_field_problem(key, known, run_type))

            entries[key] = _Field(value_node, path)

        return entries

    def sequence(self, field: _Field, what: str) -> Iterator[_Field]:
        if not isinstance(field.node, yaml.SequenceNode):
            raise self.error(field, f"expected {what}, got {_describe(field.node)}")

        for index, item in enumerate(field.node.value):
            yield _Field(item, f"{field.path}[{index}]")

    def text(self, field: _Field, what: str = "a string") -> str:
        """Return a scalar's text as written, whatever YAML would resolve it to."""
        node = field.node
        if not isinstance(node, yaml.ScalarNode) or node.tag == _NULL_TAG:
            raise self.error(field, f"expected {what}, got {_describe(node)}")

        return str(node.value)

    def integer(self, field: _Field, minimum: int, maximum: int) -> int:
        expected = f"an integer from {minimum} to {maximum}"
        node = field.node
        if not isinstance(node, yaml.ScalarNode) or node.tag != _INT_TAG:
            raise self.error(field, f"expected {expected}, got {_describe(node)}")

        if not node.value.isdigit() or not minimum <= int(node.value) <= maximum:
            raise self.error(field, f"expected {expected}, got {node.value}")

        return int(node.value)

    def boolean(self, field: _Field) -> bool:
        node = field.node
        if not isinstance(node, yaml.ScalarNode) or node.tag != _BOOL_TAG:
            raise self.error(field, f"expected true or false, got {_describe(node)}")

        return node.value.lower() in ("true", "yes", "on", "y")

    def parsed(self, field: _Field, parse: Callable[[str], object], what: str) -> str:
        """Check a scalar with a grammar parser and return its text."""
        text = self.text(field, what)
        try:
            parse(text)
        except InvalidValueError as exc:
            raise self.error(field, str(exc)) from None

        return text


def _describe(node: yaml.Node) -> str:
    if isinstance(node, yaml.MappingNode):
        return "a mapping"

    if isinstance(node, yaml.SequenceNode):
        return "a list"

    if node.tag == _NULL_TAG:
        return "no value"

    return repr(node.value)


def _unknown_field_problem(
    key: str, known: tuple[str, ...], run_type: str | None
) -> str:
    reason = UNSUPPORTED_FIELDS.get(key)
    if reason is not None:
        return f"field {key} is not supported: {reason}"

    if run_type is not None:
        types = [name for name, fields in RUN_FIELDS.items() if key in fields]
        if types:
            return (
                f"field {key} applies to type {' and '.join(types)}, not to {run_type}"
            )

    return f"unknown field {key}; expected one of: {', '.join(known)}"


# Run configuration files


def parse_run_config(path: str, text: str) -> RunConfig:
    """Parse a run configuration file's ``text``; ``path`` names it in errors.

    Raises:
        RunConfigError: the file is not valid YAML or a field is invalid.
    """
    reader = _Reader(path)
    root = reader.compose(text)
    if root is None:
        raise RunConfigError(path, "", 1, "the file is empty; expected a mapping")

    run_type = _run_type(reader, root)
    fields = reader.mapping(
        root, RUN_FIELDS[run_type], f"a {run_type} configuration", run_type
    )
    values: dict[str, object] = {"type": run_type}
    bare_env: dict[str, int] = {}
    resources: dict[str, object] = {}
    for key, field in fields.items():
        match key:
            case "type":
                continue
            case "env":
                values["env"], bare_env = _read_env(reader, field)
            case "commands" | "init":
                values[key] = _read_lines(reader, field)
            case "ports":
                values["ports"] = [
                    _read_port(reader, item)
                    for item in reader.sequence(field, "a list of port numbers")
                ]
            case "port":
                values["port"] = _read_port(reader, field)
            case "probe":
                values["probe"] = _read_probe(reader, field)
            case "max_restarts":
                values["max_restarts"] = reader.integer(field, 0, 1000)
            case "inactivity_duration":
                values[key] = reader.parsed(field, _duration_parser(key), "a duration")
            case "resources":
                resources.update(_read_resources(reader, field))
            case _:
                _read_shared_field(reader, key, field, values, resources)

    if resources:
        values["resources"] = api.ResourceArgs(**resources)  # type: ignore[arg-type]

    request = api.SubmitRun(**values)  # type: ignore[arg-type]

    return RunConfig(path=path, type=run_type, request=request, bare_env=bare_env)


def _run_type(reader: _Reader, root: _Field) -> str:
    """Read ``type`` first, since it decides which other fields are allowed."""
    if not isinstance(root.node, yaml.MappingNode):
        raise reader.error(
            root, f"expected a run configuration mapping, got {_describe(root.node)}"
        )

    for key_node, value_node in root.node.value:
        if isinstance(key_node, yaml.ScalarNode) and key_node.value == "type":
            field = _Field(value_node, "type")
            run_type = reader.text(field, "a run type")
            if run_type not in RUN_TYPES:
                raise reader.error(
                    field,
                    f"invalid type {run_type!r}: "
                    f"expected one of {', '.join(RUN_TYPES)}",
                )

            return run_type

    raise reader.error(
        root, f"missing field type; expected one of {', '.join(RUN_TYPES)}"
    )


def _read_shared_field(
    reader: _Reader,
    key: str,
    field: _Field,
    values: dict[str, object],
    resources: dict[str, object],
) -> None:
    """Read a field that run configurations and profiles share."""
    match key:
        case "name":
            values["name"] = _read_name(reader, field)
        case "pool":
            values["pool"] = _read_name(reader, field)
        case "working_dir":
            values["working_dir"] = reader.text(field, "a directory")
        case "idle_duration" | "max_duration":
            values[key] = reader.parsed(field, _duration_parser(key), "a duration")
        case "creation_policy":
            policy = reader.text(field, "a creation policy")
            if policy not in CREATION_POLICIES:
                raise reader.error(
                    field,
                    f"invalid creation_policy {policy!r}: expected "
                    f"{' or '.join(CREATION_POLICIES)}",
                )

            values["creation_policy"] = policy
        case "spot_policy":
            resources["spot_policy"] = reader.parsed(
                field, lambda text: parse_spot_policy(text, key), "a spot policy"
            )
        case "max_price":
            resources["max_price"] = reader.parsed(
                field, lambda text: parse_price(text, key), "a price"
            )
        case "backends":
            resources["backends"] = _read_backends(reader, field)
        case "retry":
            values["retry"] = _read_retry(reader, field)
        case _:
            raise AssertionError(f"field {key} has no reader")


def _duration_parser(field: str) -> Callable[[str], object]:
    return lambda text: parse_duration(text, field)


def _read_name(reader: _Reader, field: _Field) -> str:
    # Imported here because dstackd.commands imports this module.
    from dstackd.commands import NAME_RULE, check_name

    name = reader.text(field, "a name")
    try:
        check_name(field.path, name)
    except InvalidRequestError:
        raise reader.error(
            field, f"invalid name {name!r}: expected {NAME_RULE}"
        ) from None

    return name


def _read_lines(reader: _Reader, field: _Field) -> list[str]:
    if isinstance(field.node, yaml.ScalarNode) and field.node.tag == _STR_TAG:
        raise reader.error(
            field, "expected a list of shell lines; put '- ' before the line"
        )

    return [
        reader.text(item, "a shell line")
        for item in reader.sequence(field, "a list of shell lines")
    ]


def _read_env(reader: _Reader, field: _Field) -> tuple[dict[str, str], dict[str, int]]:
    """Read ``env`` as a mapping or as a list of ``NAME=VALUE`` or ``NAME``."""
    env: dict[str, str] = {}
    bare: dict[str, int] = {}
    if isinstance(field.node, yaml.MappingNode):
        for key_node, value_node in field.node.value:
            name = reader.text(_Field(key_node, field.path), "a variable name")
            item = _Field(value_node, f"{field.path}.{name}")
            _check_env_name(reader, _Field(key_node, item.path), name)
            if isinstance(value_node, yaml.ScalarNode) and value_node.tag == _NULL_TAG:
                bare[name] = item.line
            else:
                env[name] = reader.text(item, "a value")

        return env, bare

    for item in reader.sequence(field, "a mapping or a list of NAME=VALUE"):
        name, equals, value = reader.text(item, "NAME=VALUE or NAME").partition("=")
        _check_env_name(reader, item, name)
        if equals:
            env[name] = value
        else:
            bare[name] = item.line

    return env, bare


def _check_env_name(reader: _Reader, field: _Field, name: str) -> None:
    if not ENV_NAME_RE.fullmatch(name):
        raise reader.error(
            field,
            f"invalid environment variable name {name!r}: expected letters, digits "
            "and '_', not starting with a digit",
        )


def _read_port(reader: _Reader, field: _Field) -> int:
    text = reader.text(field, "a port number")
    if not _PORT_TEXT_RE.fullmatch(text) or not _MIN_PORT <= int(text) <= _MAX_PORT:
        problem = (
            f"expected a port number from {_MIN_PORT} to {_MAX_PORT}, got {text!r}"
        )
        if ":" in text:
            problem += "; runs listen on the instance's own ports, so give one number"

        raise reader.error(field, problem)

    return int(text)


def _read_probe(reader: _Reader, field: _Field) -> api.ProbeArgs:
    entries = reader.mapping(
        field, PROBE_FIELDS, "a probe mapping (path, interval, timeout)"
    )
    values: dict[str, str] = {}
    if "path" in entries:
        path = reader.text(entries["path"], "an HTTP path")
        if not path.startswith("/"):
            raise reader.error(
                entries["path"],
                f"invalid path {path!r}: expected a path starting with /",
            )

        values["path"] = path

    for key in ("interval", "timeout"):
        if key in entries:
            values[key] = reader.parsed(
                entries[key], lambda text: _positive_duration(text, key), "a duration"
            )

    return api.ProbeArgs(**values)


def _positive_duration(text: str, field: str) -> int:
    seconds = parse_duration(text, field)
    if seconds == "off" or seconds < 1:
        raise InvalidValueError(field, text, "a duration of at least 1s")

    return seconds


def _read_retry(reader: _Reader, field: _Field) -> api.RetryArgs:
    """Read ``retry: true``, ``retry: false`` or ``retry: {on_events, duration}``."""
    if isinstance(field.node, yaml.ScalarNode) and field.node.tag == _BOOL_TAG:
        if reader.boolean(field):
            return api.RetryArgs()

        return api.RetryArgs(on_events=[])

    entries = reader.mapping(
        field,
        ("on_events", "duration"),
        "true, false or a mapping (on_events, duration)",
    )
    on_events: list[str] | None = None
    if "on_events" in entries:
        on_events = []
        for item in reader.sequence(entries["on_events"], "a list of retry events"):
            event = reader.text(item, "a retry event")
            if event not in RETRY_EVENTS:
                raise reader.error(
                    item,
                    f"invalid retry event {event!r}: "
                    f"expected {', '.join(RETRY_EVENTS)}",
                )

            on_events.append(event)

    duration = None
    if "duration" in entries:
        duration = reader.parsed(
            entries["duration"], _duration_parser("retry.duration"), "a duration"
        )

    return api.RetryArgs(on_events=on_events, duration=duration)


def _read_backends(reader: _Reader, field: _Field) -> list[str]:
    if isinstance(field.node, yaml.SequenceNode):
        items = reader.sequence(field, "a list of backend names")
        texts = [reader.text(item, "a backend name") for item in items]
    else:
        texts = [reader.text(field, "a list of backend names")]

    try:
        backends = parse_backends(texts, "backends")
    except InvalidValueError as exc:
        raise reader.error(field, str(exc)) from None

    return list(backends or ())


def _read_resources(reader: _Reader, field: _Field) -> dict[str, str]:
    entries = reader.mapping(
        field, RESOURCE_FIELDS, "a mapping of cpu, memory, gpu and disk"
    )
    values: dict[str, str] = {}
    for key, item in entries.items():
        text = (
            _gpu_text(reader, item) if key == "gpu" else _range_text(reader, key, item)
        )
        try:
            if key == "gpu":
                parse_gpu(text, key)
            else:
                parse_range(text, key, unit="count" if key == "cpu" else "size")
        except InvalidValueError as exc:
            raise reader.error(item, str(exc)) from None

        values[key] = text

    return values


def _range_text(reader: _Reader, key: str, field: _Field) -> str:
    """Return a range's text; a mapping ``{min, max}`` (or ``{size}`` for disk)
    becomes ``min..max``."""
    if not isinstance(field.node, yaml.MappingNode):
        return reader.text(field, "a number or a range such as 2..8")

    known = ("size",) if key == "disk" else ("min", "max")
    entries = reader.mapping(field, known)
    if key == "disk":
        if "size" not in entries:
            raise reader.error(field, "missing field size")

        return _range_text(reader, key, entries["size"])

    lower = reader.text(entries["min"], "a number") if "min" in entries else ""
    upper = reader.text(entries["max"], "a number") if "max" in entries else ""
    if not lower and not upper:
        raise reader.error(field, "expected min, max or both")

    return f"{lower}..{upper}"


def _gpu_text(reader: _Reader, field: _Field) -> str:
    """Return a GPU spec's text; a mapping ``{name, memory, count}`` becomes
    ``NAME:MEMORY:COUNT`` in the flag grammar."""
    if not isinstance(field.node, yaml.MappingNode):
        return reader.text(field, "a GPU spec such as A100:80GB:2")

    entries = reader.mapping(field, ("name", "memory", "count"))
    parts = []
    if "name" in entries:
        names = entries["name"]
        if isinstance(names.node, yaml.SequenceNode):
            items = reader.sequence(names, "a list of GPU names")
            parts.append(",".join(reader.text(item, "a GPU name") for item in items))
        else:
            parts.append(reader.text(names, "a GPU name"))

    for key in ("memory", "count"):
        if key in entries:
            parts.append(_range_text(reader, key, entries[key]))

    if not parts:
        raise reader.error(field, "expected name, memory, count or several of them")

    return ":".join(parts)


# Profiles files


def parse_profiles(path: str, text: str) -> list[Profile]:
    """Parse a profiles file: ``profiles:`` followed by a list of profiles.

    Raises:
        RunConfigError: the file is not valid YAML, a field is invalid, or two
            profiles have one name or several are marked default.
    """
    reader = _Reader(path)
    root = reader.compose(text)
    if root is None:
        return []

    entries = reader.mapping(root, ("profiles",), "a mapping with a profiles list")
    if "profiles" not in entries:
        return []

    profiles: list[Profile] = []
    default_line: int | None = None
    for item in reader.sequence(entries["profiles"], "a list of profiles"):
        profile = _read_profile(reader, item)
        if any(other.name == profile.name for other in profiles):
            raise reader.error(item, f"duplicate profile name {profile.name!r}")

        if profile.default:
            if default_line is not None:
                raise reader.error(
                    item,
                    f"a second profile marked default; the first is on line "
                    f"{default_line}",
                )

            default_line = item.line

        profiles.append(profile)

    return profiles


def _read_profile(reader: _Reader, field: _Field) -> Profile:
    entries = reader.mapping(field, PROFILE_FIELDS, "a profile mapping")
    if "name" not in entries:
        raise reader.error(field, "missing field name")

    name = reader.text(entries["name"], "a profile name")
    default = "default" in entries and reader.boolean(entries["default"])
    values: dict[str, object] = {}
    resources: dict[str, object] = {}
    for key, item in entries.items():
        if key not in ("name", "default"):
            _read_shared_field(reader, key, item, values, resources)

    if resources:
        values["resources"] = api.ResourceArgs(**resources)  # type: ignore[arg-type]

    return Profile(
        path=reader.path,
        name=name,
        default=default,
        request=api.SubmitRun(**values),  # type: ignore[arg-type]
    )


__all__ = [
    "Profile",
    "RunConfig",
    "RunConfigError",
    "parse_profiles",
    "parse_run_config",
]
