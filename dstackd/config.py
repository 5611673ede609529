"""The daemon's optional TOML config file: its schema, defaults and validation.

Example, with every key at its default unless noted::

    [daemon]
    socket_group = "dstack"   # group name or gid; default: none, socket mode 0600
    snapshot_every = 10000    # records between projection snapshots
    log_level = "info"        # debug, info, warning, error or critical
    stop_grace_seconds = 10   # from SIGTERM to SIGKILL when a run is stopped

    [local]
    enabled = true
    cpus = 16                 # default: detected
    memory = "64GB"           # default: detected
    disk = "500GB"            # default: detected
    price_per_hour = 0.0      # USD for the whole machine
    region = "local"

    [[local.gpus]]            # default: detected; declare where detection fails
    name = "A100"
    memory = "80GB"
    count = 2                 # default: 1

    [ssh]
    connect_timeout_seconds = 10       # one SSH connect, handshake included
    keepalive_interval_seconds = 15    # 3 missed keepalives: connection lost
    lost_after_seconds = 3600          # unreachable this long: a run is lost
    health_check_interval_seconds = 30
    health_check_timeout_seconds = 10  # one health check of one host

    [aws]                     # the AWS EC2 backend is enabled by this table
    regions = ["us-east-1"]
    endpoint_url = "http://127.0.0.1:5000"  # default: AWS's; for tests only
    image_id = "ami-..."      # default: the newest Ubuntu 22.04 image
    ssh_user = "ubuntu"
    ssh_cidr = "0.0.0.0/0"    # who may connect to port 22 of the instances
    disk = "100GB"            # root volume when a run asks for no disk size
    instance_types = ["g5.xlarge"]     # default: every type in the catalog
    running_timeout_seconds = 600      # from RunInstances to the running state
    poll_interval_seconds = 5          # between two checks of the state
    terminate_timeout_seconds = 300    # from TerminateInstances to terminated
    reconcile_interval_seconds = 60
    orphan_grace_seconds = 600  # age of an unrecorded instance before teardown
    lost_grace_seconds = 300    # age of a record before a missing one is lost

AWS credentials come from the standard chain (environment, shared files, the
instance role) and are never part of this file.

Sizes are text in the grammar of ``events.grammar.parse_size`` and are checked
when the file is loaded; a bare number such as ``memory = 64`` is turned into
the text ``"64"``, which means GB. The Structs keep the text; ``memory_gb`` and
similar properties give the value in GB. Every float must be finite, and counts
and durations have upper bounds (at most 4096 CPUs, 64 GPUs per entry). Every error names the file and where in it the
problem is, e.g. ``config /etc/dstackd.toml: unknown key 'cpu' in [local]``.
"""

import grp
import ipaddress
import math
import re
import tomllib
from typing import Annotated

import msgspec

from dstackd.logging import LEVELS
from events.errors import DstackdError, InvalidValueError
from events.grammar import parse_size

_GPU_NAME_RE = re.compile(r"[A-Za-z][A-Za-z0-9_-]*", re.ASCII)
_REGION_RE = re.compile(r"[a-z]{2}(-[a-z]+)+-\d+", re.ASCII)

# msgspec's validation errors: "<problem> - at `$.path`", or the problem alone
# for the top-level table.
_VALIDATION_RE = re.compile(r"(?P<problem>.*?)(?: - at `(?P<path>\$[^`]*)`)?", re.S)
_UNKNOWN_FIELD_RE = re.compile(r"Object contains unknown field `(?P<key>[^`]*)`")
_MISSING_FIELD_RE = re.compile(r"Object missing required field `(?P<key>[^`]*)`")
_TYPE_RE = re.compile(r"Expected `(?P<expected>[^`]*)`, got `(?P<got>[^`]*)`")
_PATH_PART_RE = re.compile(r"\.([^.\[]+)|\[(\d+)\]")

# Upper bounds. Larger values are typos that would otherwise pass validation
# and fail later, because the local backend builds CPU and GPU id lists in
# memory and the grace period delays every stop.
MAX_CPUS = 4096
MAX_GPUS_PER_ENTRY = 64
MAX_STOP_GRACE_SECONDS = 3600.0
MAX_SECONDS = 7 * 24 * 3600.0

# Keys whose value is a size. A TOML number at one of them is read as its text.
_SIZE_PATHS = (
    ("local", "memory"),
    ("local", "disk"),
    ("local", "gpus", "*", "memory"),
    ("aws", "disk"),
)

# msgspec type names as a TOML user knows them. TOML has no null, so "| null"
# only marks a key as optional and is dropped.
_TOML_TYPE_NAMES = {"str": "string", "object": "table", "array": "array"}


class ConfigError(DstackdError):
    """The config file cannot be read or does not follow the schema."""

    def __init__(self, path: str, problem: str) -> None:
        self.path = path
        self.problem = problem
        super().__init__(f"config {path}: {problem}")


class DaemonConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The ``[daemon]`` table."""

    socket_group: str | Annotated[int, msgspec.Meta(ge=0)] | None = None
    snapshot_every: Annotated[int, msgspec.Meta(ge=1)] = 10_000
    log_level: str = "info"
    stop_grace_seconds: Annotated[
        float, msgspec.Meta(ge=0, le=MAX_STOP_GRACE_SECONDS)
    ] = 10.0

    @property
    def socket_mode(self) -> int:
        """Mode of a socket the daemon binds: group access only with a group."""
        return 0o660 if self.socket_group is not None else 0o600

    def socket_gid(self) -> int | None:
        """Return the gid of ``socket_group``, looking a name up in the group db.

        Raises:
            KeyError: no group has that name.
        """
        group = self.socket_group
        if group is None or isinstance(group, int):
            return group

        if group.isdigit():
            return int(group)

        return grp.getgrnam(group).gr_gid


class GpuConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One ``[[local.gpus]]`` entry: ``count`` GPUs of one model."""

    name: str
    memory: str
    count: Annotated[int, msgspec.Meta(ge=1, le=MAX_GPUS_PER_ENTRY)] = 1

    @property
    def memory_gb(self) -> float:
        """Memory per GPU in GB."""
        return parse_size(self.memory, "memory")


class LocalConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The ``[local]`` table: this machine as a backend.

    ``None`` means that the local backend detects the value.
    """

    enabled: bool = True
    cpus: Annotated[int, msgspec.Meta(ge=1, le=MAX_CPUS)] | None = None
    memory: str | None = None
    disk: str | None = None
    price_per_hour: Annotated[float, msgspec.Meta(ge=0)] = 0.0
    region: Annotated[str, msgspec.Meta(min_length=1)] = "local"
    gpus: tuple[GpuConfig, ...] | None = None

    @property
    def memory_gb(self) -> float | None:
        return None if self.memory is None else parse_size(self.memory, "memory")

    @property
    def disk_gb(self) -> float | None:
        return None if self.disk is None else parse_size(self.disk, "disk")


Seconds = Annotated[float, msgspec.Meta(gt=0, le=MAX_SECONDS)]
GraceSeconds = Annotated[float, msgspec.Meta(ge=0, le=MAX_SECONDS)]


class SshConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The ``[ssh]`` table: connections to SSH hosts and cloud instances."""

    connect_timeout_seconds: Seconds = 10.0
    keepalive_interval_seconds: Seconds = 15.0
    lost_after_seconds: Seconds = 3600.0
    health_check_interval_seconds: Seconds = 30.0
    health_check_timeout_seconds: Seconds = 10.0


class AwsConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The ``[aws]`` table: the AWS EC2 backend, enabled when the table exists.

    ``endpoint_url`` replaces AWS's own endpoints; tests point it at a local
    mock. ``instance_types`` limits the catalog; ``None`` offers all of it.
    """

    regions: Annotated[tuple[str, ...], msgspec.Meta(min_length=1)] = ("us-east-1",)
    endpoint_url: str | None = None
    image_id: str | None = None
    ssh_user: Annotated[str, msgspec.Meta(min_length=1)] = "ubuntu"
    ssh_cidr: str = "0.0.0.0/0"
    disk: str = "100GB"
    instance_types: tuple[str, ...] | None = None
    running_timeout_seconds: Seconds = 600.0
    poll_interval_seconds: Seconds = 5.0
    terminate_timeout_seconds: Seconds = 300.0
    reconcile_interval_seconds: Seconds = 60.0
    orphan_grace_seconds: GraceSeconds = 600.0
    lost_grace_seconds: GraceSeconds = 300.0

    @property
    def disk_gb(self) -> float:
        return parse_size(self.disk, "disk")


class Config(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The whole config file; ``Config()`` is the configuration without a file."""

    daemon: DaemonConfig = DaemonConfig()
    local: LocalConfig = LocalConfig()
    ssh: SshConfig = SshConfig()
    aws: AwsConfig | None = None


def load_config(path: str | None) -> Config:
    """Read and validate the config file at ``path``; None gives the defaults.

    Raises:
        ConfigError: the file cannot be read, is not valid TOML, has an unknown
            key, a value of the wrong type, or a value outside its grammar.
    """
    if path is None:
        return Config()

    try:
        with open(path, "rb") as file:
            data = tomllib.load(file)
    except OSError as exc:
        raise ConfigError(path, f"cannot read it: {exc.strerror or exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(path, f"invalid TOML: {exc}") from None

    problem = _check_finite(data, "$")
    if problem is not None:
        raise ConfigError(path, problem)

    _sizes_as_text(data)
    try:
        config = msgspec.convert(data, Config)
    except msgspec.ValidationError as exc:
        raise ConfigError(path, describe_validation_error(str(exc), data)) from None

    problem = check_values(config)
    if problem is not None:
        raise ConfigError(path, problem)

    return config


def check_values(config: Config) -> str | None:
    """Check what the Struct types cannot express; return the first problem or None.

    That is the log level name, the socket group's existence, GPU names and
    the sizes, which go through ``events.grammar.parse_size``.
    """
    daemon, local = config.daemon, config.local
    if daemon.log_level.lower() not in LEVELS:
        return (
            f"invalid value {daemon.log_level!r} at $.daemon.log_level: "
            f"expected one of {', '.join(LEVELS)}"
        )

    try:
        daemon.socket_gid()
    except KeyError:
        group = daemon.socket_group
        return (
            f"group {group!r} at $.daemon.socket_group does not exist: "
            f"create it (groupadd --system {group}) or give a gid"
        )

    sizes = [("$.local.memory", local.memory), ("$.local.disk", local.disk)]
    for index, gpu in enumerate(local.gpus or ()):
        where = f"$.local.gpus[{index}]"
        if not _GPU_NAME_RE.fullmatch(gpu.name):
            return (
                f"invalid GPU name {gpu.name!r} at {where}.name: expected letters, "
                "digits, '_' and '-', starting with a letter (A100, RTX4090)"
            )

        sizes.append((f"{where}.memory", gpu.memory))

    if config.aws is not None:
        sizes.append(("$.aws.disk", config.aws.disk))

    for where, text in sizes:
        if text is not None:
            problem = _check_size(where, text)
            if problem is not None:
                return problem

    return None if config.aws is None else _check_aws(config.aws)


def _check_finite(node: object, path: str) -> str | None:
    """Return a problem for the first inf or nan in the decoded document, or None.

    TOML allows ``inf`` and ``nan``, and no key of this file takes them.
    """
    if isinstance(node, float) and not math.isfinite(node):
        return f"invalid value {node!r} at {path}: expected a finite number"

    if isinstance(node, dict):
        children = [(f"{path}.{key}", value) for key, value in node.items()]
    elif isinstance(node, list):
        children = [(f"{path}[{index}]", value) for index, value in enumerate(node)]
    else:
        return None

    for child_path, child in children:
        problem = _check_finite(child, child_path)
        if problem is not None:
            return problem

    return None


def _sizes_as_text(data: dict[str, object]) -> None:
    """Replace TOML numbers at size keys with their text, in place.

    ``memory = 64`` then reads as ``"64"``, a bare number of GB. Other types
    stay for msgspec to reject.
    """
    for size_path in _SIZE_PATHS:
        _replace_number(data, size_path)


def _replace_number(node: object, parts: tuple[str, ...]) -> None:
    head, rest = parts[0], parts[1:]
    if head == "*":
        children = list(enumerate(node)) if isinstance(node, list) else []
    elif isinstance(node, dict) and head in node:
        children = [(head, node[head])]
    else:
        return

    for key, child in children:
        if rest:
            _replace_number(child, rest)
        elif isinstance(child, int | float) and not isinstance(child, bool):
            node[key] = str(child)  # type: ignore[index]


def _check_aws(aws: AwsConfig) -> str | None:
    for index, region in enumerate(aws.regions):
        if not _REGION_RE.fullmatch(region):
            return (
                f"invalid region {region!r} at $.aws.regions[{index}]: expected an "
                "AWS region name such as us-east-1"
            )

    url = aws.endpoint_url
    if url is not None and not url.startswith(("http://", "https://")):
        return (
            f"invalid endpoint URL {url!r} at $.aws.endpoint_url: expected "
            "http://HOST:PORT or https://HOST"
        )

    try:
        ipaddress.ip_network(aws.ssh_cidr)
    except ValueError:
        return (
            f"invalid CIDR {aws.ssh_cidr!r} at $.aws.ssh_cidr: expected an "
            "address range such as 203.0.113.0/24"
        )

    return None


def _check_size(where: str, text: str) -> str | None:
    try:
        size = parse_size(text, where)
    except InvalidValueError as exc:
        return f"invalid value {text!r} at {where}: expected {exc.expected}"

    if size <= 0:
        return f"invalid value {text!r} at {where}: expected a size above 0"

    return None


def describe_validation_error(message: str, data: dict[str, object]) -> str:
    """Reword a msgspec validation error in terms of TOML keys and tables.

    ``data`` is the decoded document, used to tell unknown tables from keys.
    """
    match = _VALIDATION_RE.fullmatch(message)
    assert match is not None, "the pattern matches any text"
    problem, path = match["problem"], match["path"] or "$"

    if unknown := _UNKNOWN_FIELD_RE.fullmatch(problem):
        key = unknown["key"]
        if isinstance(_lookup(data, [*_path_parts(path), key]), dict):
            return f"unknown table [{_dotted(path, key)}]"

        return f"unknown key {key!r} {_where_table(path)}"

    if missing := _MISSING_FIELD_RE.fullmatch(problem):
        return f"missing required key {missing['key']!r} {_where_table(path)}"

    if wrong_type := _TYPE_RE.fullmatch(problem):
        expected = _toml_type(wrong_type["expected"])
        got = _toml_type(wrong_type["got"])
        return f"expected {expected} at {path}, got {got}"

    # Constraint errors, e.g. "Expected `int` >= 1", which omit the value.
    text = re.sub(r"`([^`]*)`", lambda quoted: _toml_type(quoted[1]), problem)
    text = text[:1].lower() + text[1:]
    value = _lookup(data, _path_parts(path))
    if isinstance(value, int | float | str):
        return f"{text} at {path}, got {value!r}"

    return f"{text} at {path}"


def _toml_type(name: str) -> str:
    parts = [part.strip() for part in name.split("|")]
    parts = [_TOML_TYPE_NAMES.get(part, part) for part in parts if part != "null"]

    return " | ".join(parts)


def _path_parts(path: str) -> list[str | int]:
    parts: list[str | int] = []
    for key, index in _PATH_PART_RE.findall(path):
        parts.append(key if key else int(index))

    return parts


def _lookup(data: object, parts: list[str | int]) -> object:
    node = data
    for part in parts:
        if isinstance(part, int) and isinstance(node, list) and part < len(node):
            node = node[part]
        elif isinstance(part, str) and isinstance(node, dict):
            node = node.get(part)
        else:
            return None

    return node


def _dotted(path: str, key: str) -> str:
    names = [part for part in _path_parts(path) if isinstance(part, str)]

    return ".".join([*names, key])


def _where_table(path: str) -> str:
    """Name the table at ``path``: ``in [local]`` or ``in [[local.gpus]] entry 1``."""
    parts = _path_parts(path)
    if not parts:
        return "at the top level"

    if isinstance(parts[-1], int):
        names = ".".join(str(part) for part in parts[:-1] if isinstance(part, str))
        return f"in [[{names}]] entry {parts[-1] + 1}"

    return "in [" + ".".join(str(part) for part in parts) + "]"
