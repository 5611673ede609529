"""This daemon's identity: a random id kept in ``<data dir>/daemon_id``.

Cloud resources that the daemon creates carry the id as a tag, so
reconciliation finds exactly this daemon's instances, even when several
daemons share one cloud account. The id is created on the first start and
never changes while the data directory is kept.
"""

import os
import re
import secrets

from events.errors import DstackdError

DAEMON_ID_FILE = "daemon_id"
_DAEMON_ID_RE = re.compile(r"d-[0-9a-f]{12}")


class DaemonIdError(DstackdError):
    """The daemon id file exists but does not contain a valid id."""

    def __init__(self, path: str, content: str) -> None:
        super().__init__(
            f"invalid daemon id {content[:40]!r} in {path}: expected d- and 12 hex "
            "digits; restore the file from a backup, because cloud instances are "
            "tagged with the old id"
        )


def load_daemon_id(data_dir: str) -> str:
    """Return the daemon id stored in ``data_dir``, creating it on first use.

    Raises:
        DaemonIdError: the file exists and is malformed.
    """
    path = os.path.join(data_dir, DAEMON_ID_FILE)
    try:
        with open(path, encoding="ascii") as file:
            content = file.read().strip()
    except FileNotFoundError:
        return _create(path)

    if not _DAEMON_ID_RE.fullmatch(content):
        raise DaemonIdError(path, content)

    return content


def _create(path: str) -> str:
    daemon_id = "d-" + secrets.token_hex(6)
    temporary = f"{path}.{os.getpid()}.tmp"
    with open(temporary, "w", encoding="ascii") as file:
        file.write(daemon_id + "\n")
        file.flush()
        os.fsync(file.fileno())

    try:
        # A link fails if another process created the file first, and then
        # that process's id wins.
        os.link(temporary, path)
    except FileExistsError:
        return load_daemon_id(os.path.dirname(path))
    finally:
        os.unlink(temporary)

    return daemon_id
