"""The SSH backend: hosts the user already has, reached with asyncssh.

A host joins a pool through ``pool add --ssh``, which connects, detects its
CPUs, memory, disk and NVIDIA GPUs, and records the host in the log. The
instance's ``backend_data`` stores how to reach it again: host, port, user, the
path of the private key (never the key itself) and the host's public key, which
later connections require, so a replaced host is not trusted silently. Hosts
are never created or torn down: ``terminate`` only forgets them.

asyncssh is imported on the first connect, so a daemon without SSH hosts never
loads it.
"""

import math
import re
import shlex
from types import ModuleType
from typing import TYPE_CHECKING

import anyio
import msgspec
import structlog

from dstackd.backends.base import BackendError, LiveInstance, Provisioned
from dstackd.backends.local import short_gpu_name
from events.errors import InvalidValueError
from events.model import Gpu, Offer, Requirements, Resources

if TYPE_CHECKING:
    import asyncssh

log = structlog.get_logger(__name__)

BACKEND_NAME = "ssh"
DEFAULT_PORT = 22

# How many keepalive requests may go unanswered before a connection counts as
# lost, so a host that stops answering is noticed after about this many
# keepalive intervals.
KEEPALIVE_COUNT_MAX = 3

TARGET_FORMS = "USER@HOST or USER@HOST:PORT, with an IPv6 address in brackets"
_TARGET_RE = re.compile(
    r"(?P<user>[A-Za-z_][A-Za-z0-9._-]*)@"
    r"(?:\[(?P<ipv6>[0-9A-Fa-f:.]+)\]|(?P<host>[A-Za-z0-9][A-Za-z0-9.-]*))"
    r"(?::(?P<port>\d{1,5}))?"
)

# Prints one key=value line per fact; GPUs come from nvidia-smi when it exists.
# Disk is the free space of the file system of the user's home, where runs keep
# their files.
DETECT_SCRIPT = r"""
echo "cpus=$(nproc)"
awk '/^MemTotal:/ {print "memory_kb=" $2}' /proc/meminfo
df -Pk "$HOME" | awk 'NR == 2 {print "disk_free_kb=" $4}'
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader,nounits |
    sed 's/^/gpu=/'
fi
"""


class SshError(BackendError):
    """A connection to an SSH host or a command on it failed."""

    def __init__(self, address: str, action: str, reason: str) -> None:
        self.address = address
        self.reason = reason
        super().__init__(f"{action} {address} failed: {reason}")


class SshCommandError(SshError):
    """A command on an SSH host ran and exited with a status other than 0."""


class SshTarget(msgspec.Struct, frozen=True):
    """How to reach a host: user, host, port and the private key's path.

    An empty ``key_path`` uses the daemon user's default keys and agent.
    ``host_key`` is the host's public key in OpenSSH format, pinned when the
    host was added; empty accepts any host key.
    """

    user: str
    host: str
    port: int = DEFAULT_PORT
    key_path: str = ""
    host_key: str = ""

    @property
    def address(self) -> str:
        """The target as ``user@host:port`` for messages and logs."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.user}@{host}:{self.port}"

    def to_backend_data(self) -> dict[str, str]:
        data = {
            "host": self.host,
            "port": str(self.port),
            "user": self.user,
            "key_path": self.key_path,
        }
        if self.host_key:
            data["host_key"] = self.host_key

        return data

    @classmethod
    def from_backend_data(cls, data: dict[str, str]) -> "SshTarget":
        """Decode what ``to_backend_data`` wrote.

        Raises:
            BackendError: host, port or user is missing or malformed.
        """
        try:
            return cls(
                user=data["user"],
                host=data["host"],
                port=int(data.get("port", DEFAULT_PORT)),
                key_path=data.get("key_path", ""),
                host_key=data.get("host_key", ""),
            )
        except (KeyError, ValueError) as exc:
            raise BackendError(
                f"invalid SSH backend_data {sorted(data)}: {exc!r}; expected host, "
                "port and user as written when the host was added"
            ) from exc


def parse_ssh_target(text: str, key_path: str = "") -> SshTarget:
    """Parse ``USER@HOST[:PORT]``; ``[ADDRESS]`` encloses an IPv6 address.

    Raises:
        InvalidValueError: ``text`` does not have that form or the port is
            outside 1..65535.
    """
    match = _TARGET_RE.fullmatch(text.strip())
    if match is None:
        raise InvalidValueError("ssh host", text, TARGET_FORMS)

    port = int(match["port"] or DEFAULT_PORT)
    if not 1 <= port <= 65535:
        raise InvalidValueError("ssh port", port, "a port number from 1 to 65535")

    host = match["ipv6"] or match["host"]

    return SshTarget(user=match["user"], host=host, port=port, key_path=key_path)


def _asyncssh() -> ModuleType:
    import asyncssh

    return asyncssh


async def connect(
    target: SshTarget, *, timeout: float, keepalive_interval: float | None = None
) -> "asyncssh.SSHClientConnection":
    """Open a connection to ``target``, authenticated, within ``timeout`` seconds.

    With ``keepalive_interval`` (seconds), the connection closes itself when
    the host leaves ``KEEPALIVE_COUNT_MAX`` keepalive requests in a row
    unanswered, so a long command on it cannot hang forever.

    Raises:
        SshError: the connect, the handshake or the login failed or timed out,
            or the host key differs from the pinned one.
    """
    asyncssh = _asyncssh()
    options: dict[str, object] = {
        "port": target.port,
        "username": target.user,
        "connect_timeout": timeout,
        "known_hosts": _known_hosts(asyncssh, target),
    }
    if target.key_path:
        # Only the given key: the agent could offer other identities first.
        options["client_keys"] = [target.key_path]
        options["agent_path"] = None

    if keepalive_interval is not None:
        options["keepalive_interval"] = keepalive_interval
        options["keepalive_count_max"] = KEEPALIVE_COUNT_MAX

    try:
        # asyncssh's connect_timeout covers the whole login; fail_after is a
        # second bound in case a step of it does not honour the timeout.
        with anyio.fail_after(timeout + 1):
            return await asyncssh.connect(target.host, **options)
    except TimeoutError:
        raise SshError(
            target.address, "connecting to", f"timed out after {timeout:g}s"
        ) from None
    except asyncssh.HostKeyNotVerifiable as exc:
        raise SshError(
            target.address,
            "connecting to",
            f"the host key differs from the one recorded when the host was "
            f"added ({exc.reason}); remove the instance and add the host again "
            "if the change is expected",
        ) from None
    except (OSError, asyncssh.Error, ValueError) as exc:
        raise SshError(target.address, "connecting to", _describe(exc)) from None


def _known_hosts(asyncssh: ModuleType, target: SshTarget) -> object:
    if not target.host_key:
        # NOTE: no pinned key (a host being added, or a cloud instance whose
        # key is unknown before the first connect) accepts any host key.
        return None

    key = asyncssh.import_public_key(target.host_key)

    return ([key], [], [])


def _describe(exc: BaseException) -> str:
    reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None)

    return str(reason or exc or type(exc).__name__)


async def run_command(
    connection: "asyncssh.SSHClientConnection",
    address: str,
    command: str,
    *,
    timeout: float,
    input: str | None = None,
) -> str:
    """Run ``command`` on the host and return its stdout.

    ``input`` goes to the command's stdin, which keeps secrets such as
    environment values off the remote command line.

    Raises:
        SshCommandError: the command exited with a status other than 0 (its
            stderr is in the message).
        SshError: the command timed out or the connection broke.
    """
    asyncssh = _asyncssh()
    try:
        with anyio.fail_after(timeout):
            result = await connection.run(command, input=input, check=False)
    except TimeoutError:
        raise SshError(
            address, "running a command on", f"timed out after {timeout:g}s"
        ) from None
    except (OSError, asyncssh.Error) as exc:
        raise SshError(address, "running a command on", _describe(exc)) from None

    stdout = _as_text(result.stdout)
    if result.exit_status != 0:
        stderr = _as_text(result.stderr).strip()[-500:]
        raise SshCommandError(
            address,
            "running a command on",
            f"exit status {result.exit_status}: {stderr or 'no error output'}",
        )

    return stdout


def _as_text(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode(errors="replace")

    return "" if value is None else str(value)


def parse_detection(output: str) -> Resources:
    """Build resources from the output of ``DETECT_SCRIPT``.

    Memory and disk are in GB rounded down to 0.1 GB. GPU memory is the total
    nvidia-smi reports in MiB, rounded to whole GB, and GPU indices follow
    nvidia-smi's order.

    Raises:
        BackendError: a required line is missing or a value is not a number.
    """
    values: dict[str, str] = {}
    gpus: list[Gpu] = []
    for line in output.splitlines():
        key, equals, value = line.partition("=")
        if not equals:
            continue

        if key.strip() == "gpu":
            gpus.append(_parse_gpu_line(value, index=len(gpus)))
        else:
            values[key.strip()] = value.strip()

    try:
        cpus = int(values["cpus"])
        memory_gb = _kb_to_gb(int(values["memory_kb"]))
        disk_gb = _kb_to_gb(int(values.get("disk_free_kb", "0")))
    except (KeyError, ValueError) as exc:
        raise BackendError(
            f"invalid resource detection output {output[:300]!r}: {exc!r}; the "
            "host needs nproc, awk, df and /proc/meminfo"
        ) from exc

    return Resources(cpus=cpus, memory_gb=memory_gb, gpus=tuple(gpus), disk_gb=disk_gb)


def _parse_gpu_line(value: str, index: int) -> Gpu:
    name, _, memory_mib = value.rpartition(",")
    try:
        memory_gb = float(round(float(memory_mib) / 1024))
    except ValueError as exc:
        raise BackendError(
            f"invalid nvidia-smi line {value!r}: expected NAME, MEMORY_MIB"
        ) from exc

    return Gpu(name=short_gpu_name(name.strip()), memory_gb=memory_gb, index=index)


def _kb_to_gb(kilobytes: int) -> float:
    return math.floor(kilobytes / 1024**2 * 10) / 10


def host_offer(target: SshTarget, resources: Resources) -> Offer:
    """Describe a detected host as the offer its ``InstanceRequested`` records."""
    return Offer(
        backend=BACKEND_NAME,
        region=target.host,
        instance_type="ssh-host",
        resources=resources,
        spot=False,
        price=0.0,
    )


class SshBackend:
    """Hosts reached over SSH; see the module docstring.

    Args:
        connect_timeout: seconds for one connect, handshake and login included.
    """

    name = BACKEND_NAME

    def __init__(self, *, connect_timeout: float = 10.0) -> None:
        self.connect_timeout = connect_timeout

    async def list_offers(self, requirements: Requirements) -> list[Offer]:
        """Return no offers: hosts join pools only through ``pool add --ssh``."""
        return []

    async def create(self, instance_id: str, offer: Offer) -> Provisioned:
        raise BackendError(
            f"create instance {instance_id}: the ssh backend cannot create hosts; "
            "add one with 'dstackctl pool add --ssh USER@HOST'"
        )

    async def terminate(self, instance_id: str, backend_data: dict[str, str]) -> None:
        """Forget the host; nothing runs on it, since its run was stopped first."""
        log.info("ssh_host_forgotten", instance_id=instance_id)

    def restore(self, live: list[LiveInstance]) -> None:
        """Do nothing: each connection reads its target from ``backend_data``."""

    async def detect(self, target: SshTarget) -> tuple[Resources, str]:
        """Connect to ``target`` and return its resources and its host key.

        The host key comes back in OpenSSH format, to be pinned in
        ``backend_data``.

        Raises:
            SshError: the connect or the detection command failed.
        """
        connection = await connect(target, timeout=self.connect_timeout)
        async with connection:
            output = await run_command(
                connection,
                target.address,
                "sh -c " + shlex.quote(DETECT_SCRIPT),
                timeout=self.connect_timeout * 3,
            )
            host_key = connection.get_server_host_key()

        key_text = ""
        if host_key is not None:
            key_text = host_key.export_public_key("openssh").decode().strip()

        try:
            resources = parse_detection(output)
        except BackendError as exc:
            raise SshError(
                target.address, "detecting the resources of", str(exc)
            ) from exc

        return resources, key_text

    async def check(self, target: SshTarget, timeout: float) -> None:
        """Connect and run ``true`` within ``timeout`` seconds.

        Raises:
            SshError: the host did not respond in time or the command failed.
        """
        try:
            with anyio.fail_after(timeout):
                connection = await connect(target, timeout=timeout)
                async with connection:
                    await run_command(
                        connection, target.address, "true", timeout=timeout
                    )
        except TimeoutError:
            raise SshError(
                target.address, "checking", f"timed out after {timeout:g}s"
            ) from None
