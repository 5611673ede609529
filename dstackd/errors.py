"""Errors the daemon raises for rejected commands, each mapped to an HTTP status."""

from events.errors import DstackdError


class CommandError(DstackdError):
    """A command was rejected; nothing was appended to the log."""

    status = 400
    code = "invalid_request"


class InvalidRequestError(CommandError):
    status = 400
    code = "invalid_request"


class NotFoundError(CommandError):
    status = 404
    code = "not_found"

    def __init__(self, kind: str, name: str, hint: str = "") -> None:
        self.kind = kind
        self.name = name
        message = f"{kind} {name!r} not found"
        if hint:
            message += f"; {hint}"

        super().__init__(message)


class ConflictError(CommandError):
    status = 409
    code = "conflict"


class ForbiddenError(CommandError):
    """The caller may not act on this object: it belongs to another user."""

    status = 403
    code = "forbidden"
