"""Process-wide log configuration of the daemon: structlog, stdlib logging, redaction.

``configure_logging`` is the only function here that changes global state, and
the daemon calls it at start-up. Output is JSON lines, one object per event,
when the daemon writes to journald or to anything but a terminal, and
structlog's console format on a terminal.
Records of the standard ``logging`` module (e.g. from aiohttp) go through the
same timestamping, redaction and rendering.

Redaction (``redact_secrets``) replaces values with ``***`` by these rules:

- A key whose words include one of ``SECRET_WORDS`` (``api_token``,
  ``aws_secret_access_key``, ``db_password``, ``X-Auth-Token``), unless its last
  word names a property of the secret rather than the secret itself
  (``token_expires``, ``secret_name``, ``password_file``).
- A key named ``key``, or ending in ``key``/``keys`` after a word that makes
  it secret (``api_key``, ``private_key``, ``ssh_key``, ``access_key``). Other
  keys that end in ``key`` (``instance_key``, ``idempotency_key``,
  ``public_key``) usually name ids and are kept, as are ``key_name`` and
  ``key_id``.
- The values (not the names) of an environment: ``env``, ``environ``,
  ``environment`` or a key ending in ``_env``, as a mapping or ``NAME=value``
  strings, since run environments routinely carry credentials.
- AWS credentials anywhere in a string: access key ids (``AKIA`` or ``ASIA``
  followed by 16 upper-case letters or digits) and the value after
  ``aws_secret_access_key`` or ``aws_session_token`` with ``=`` or ``:``.

Keys are split into words at every character other than a letter or digit and
at camelCase boundaries, and compared in lower case. The rules apply inside nested dicts, lists and tuples.
The AWS patterns are applied once more to each rendered line, which also covers
values that are rendered with ``repr``. A ``None`` value is kept, since it only
shows that the value is unset.
"""

import logging
import os
import re
import sys
from collections.abc import Mapping
from typing import Any, TextIO

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

from events.errors import InvalidValueError

REDACTED = "***"

LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}

SECRET_WORDS = frozenset(
    {
        "token",
        "tokens",
        "secret",
        "secrets",
        "password",
        "passwords",
        "passwd",
        "passphrase",
        "credential",
        "credentials",
        "authorization",
        "cookie",
        "cookies",
        "apikey",
    }
)

# Words before a final "key" that make the key a secret.
SECRET_KEY_QUALIFIERS = frozenset(
    {
        "access",
        "api",
        "auth",
        "client",
        "encryption",
        "license",
        "master",
        "private",
        "secret",
        "session",
        "signing",
        "ssh",
    }
)

# Last words that name a property of a secret, not the secret.
NON_SECRET_LAST_WORDS = frozenset(
    {
        "count",
        "expires",
        "expiry",
        "file",
        "id",
        "ids",
        "length",
        "name",
        "names",
        "path",
        "type",
    }
)

ENV_KEYS = frozenset({"env", "environ", "environment"})

_WORD = re.compile(r"[A-Z]?[a-z0-9]+|[A-Z]+(?![a-z])")
_AWS_ACCESS_KEY_ID = re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b")
_AWS_SECRET_ASSIGNMENT = re.compile(
    r"(?i)\b(aws_secret_access_key|aws_session_token)(['\"]?\s*[=:]\s*['\"]?)"
    r"[^\s'\",;]+"
)

# Nested values deeper than this are replaced whole, which also stops cycles.
_MAX_DEPTH = 8

# Marks the handler that configure_logging installs, so that a second call
# replaces it instead of adding another.
_HANDLER_NAME = "dstackd"


def configure_logging(
    level: str,
    *,
    json: bool | None = None,
    stream: TextIO | None = None,
    env: Mapping[str, str] = os.environ,
) -> None:
    """Configure structlog and stdlib logging to write to ``stream`` (stderr).

    Args:
        level: minimum level, one of ``LEVELS`` (case-insensitive).
        json: JSON lines (True) or console output (False). None picks JSON
            when ``stream`` is journald's (``JOURNAL_STREAM`` names its device
            and inode) or is not a terminal, and console output otherwise.
        stream: where log lines go; stderr by default.
        env: the environment that ``JOURNAL_STREAM`` is read from.

    Raises:
        InvalidValueError: ``level`` is not a known level name.
    """
    level_number = LEVELS.get(level.lower())
    if level_number is None:
        raise InvalidValueError("log level", level, "one of " + ", ".join(LEVELS))

    if stream is None:
        stream = sys.stderr

    if json is None:
        json = is_journal_stream(stream, env) or not _is_terminal(stream)

    renderer: Processor
    if json:
        renderer = structlog.processors.JSONRenderer()
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=_is_terminal(stream))

    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            *_shared_processors(),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            redact_secrets,
            renderer,
            scrub_rendered_line,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level_number),
        logger_factory=structlog.WriteLoggerFactory(file=stream),
        # Caching would pin loggers to this configuration, so a later call
        # (a new level, or capture_logs in tests) would not reach them.
        cache_logger_on_first_use=False,
    )
    _configure_stdlib(level_number, stream, renderer)


def is_journal_stream(stream: TextIO, env: Mapping[str, str] = os.environ) -> bool:
    """Return whether ``stream`` is connected to journald.

    systemd sets ``JOURNAL_STREAM`` to ``<device>:<inode>`` of the journal
    stream. Comparing it with the stream's own file, as systemd.exec(5)
    advises, avoids trusting a variable that a child inherited after its
    output was redirected elsewhere.
    """
    value = env.get("JOURNAL_STREAM", "")
    device, _, inode = value.partition(":")
    if not device.isdigit() or not inode.isdigit():
        return False

    try:
        info = os.fstat(stream.fileno())
    except (OSError, ValueError):
        # ValueError: io.UnsupportedOperation for streams with no descriptor.
        return False

    return (info.st_dev, info.st_ino) == (int(device), int(inode))


def redact_secrets(
    logger: WrappedLogger, method_name: str, event_dict: EventDict
) -> EventDict:
    """Replace secret values in ``event_dict`` by the rules in the module docstring."""
    for key, value in event_dict.items():
        event_dict[key] = _redact_item(key, value, 0)

    return event_dict


def scrub_rendered_line(logger: WrappedLogger, method_name: str, line: Any) -> Any:
    """Apply the AWS credential patterns to a rendered line."""
    if isinstance(line, str):
        return _redact_text(line)

    return line


def is_secret_key(key: str) -> bool:
    """Return whether a value logged under ``key`` is replaced with ``***``."""
    words = [word.lower() for word in _WORD.findall(key)]
    if not words:
        return False

    last = words[-1]
    if last in NON_SECRET_LAST_WORDS:
        return False

    if any(word in SECRET_WORDS for word in words):
        return True

    if last in ("key", "keys"):
        return len(words) == 1 or words[-2] in SECRET_KEY_QUALIFIERS

    return False


def _is_env_key(key: str) -> bool:
    lowered = key.lower()

    return lowered in ENV_KEYS or lowered.endswith("_env")


def _redact_item(key: object, value: object, depth: int) -> object:
    if value is None or not isinstance(key, str):
        return _redact_value(value, depth)

    if is_secret_key(key):
        return REDACTED

    if _is_env_key(key):
        return _redact_env(value)

    return _redact_value(value, depth)


def _redact_value(value: object, depth: int) -> object:
    if isinstance(value, str):
        return _redact_text(value)

    if depth >= _MAX_DEPTH and isinstance(value, (Mapping, list, tuple)):
        return REDACTED

    if isinstance(value, Mapping):
        return {k: _redact_item(k, v, depth + 1) for k, v in value.items()}

    if isinstance(value, list):
        return [_redact_value(item, depth + 1) for item in value]

    if isinstance(value, tuple):
        # A plain tuple, since a named tuple's constructor takes its fields.
        return tuple(_redact_value(item, depth + 1) for item in value)

    return value


def _redact_env(value: object) -> object:
    if isinstance(value, Mapping):
        return {name: REDACTED for name in value}

    if isinstance(value, (list, tuple)):
        return [_redact_env_entry(item) for item in value]

    if value is None:
        return None

    return REDACTED


def _redact_env_entry(item: object) -> str:
    if isinstance(item, str) and "=" in item:
        name, _, _ = item.partition("=")
        return f"{name}={REDACTED}"

    return REDACTED


def _redact_text(text: str) -> str:
    text = _AWS_ACCESS_KEY_ID.sub(REDACTED, text)

    return _AWS_SECRET_ASSIGNMENT.sub(rf"\1\2{REDACTED}", text)


def _shared_processors() -> list[Processor]:
    return [
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]


def _configure_stdlib(level: int, stream: TextIO, renderer: Processor) -> None:
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[structlog.stdlib.add_logger_name, *_shared_processors()],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            redact_secrets,
            renderer,
            scrub_rendered_line,
        ],
    )
    handler = logging.StreamHandler(stream)
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(formatter)

    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == _HANDLER_NAME]:
        root.removeHandler(old)
        old.close()

    root.addHandler(handler)
    root.setLevel(level)


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except ValueError:
        # A closed stream raises ValueError.
        return False

