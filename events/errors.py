"""Errors raised by the events package; the root of every dstackd error."""


class DstackdError(Exception):
    """Root of every error dstackd raises on purpose."""


class InvalidValueError(DstackdError, ValueError):
    """A value given by a user does not follow its grammar.

    The message names the field, the value and the accepted forms.
    """

    def __init__(self, field: str, value: object, expected: str) -> None:
        self.field = field
        self.value = value
        self.expected = expected
        super().__init__(f"invalid {field} {value!r}: expected {expected}")


class VersionConflictError(DstackdError):
    """An append expected a stream version that the stream is no longer at."""

    def __init__(self, stream: str, expected: int, actual: int) -> None:
        self.stream = stream
        self.expected = expected
        self.actual = actual
        super().__init__(
            f"stream {stream} is at version {actual}, not the expected {expected}: "
            "reload the state and retry"
        )


class LogCorruptedError(DstackdError):
    """The log holds a record whose hash or framing does not check out."""

    def __init__(self, path: str, position: int, problem: str, repair: str = "") -> None:
        self.path = path
        self.position = position
        self.problem = problem
        message = f"event log {path} is corrupted at position {position}: {problem}"
        if repair:
            message += f"; {repair}"

        super().__init__(message)


class LogClosedError(DstackdError):
    """An append was made after the log was closed."""

    def __init__(self, path: str) -> None:
        super().__init__(f"event log {path} is closed")
