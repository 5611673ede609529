"""Exit codes of dstackctl and the mapping from daemon error responses to them.

Scripts branch on these values, so a value must keep its meaning. They are defined
here rather than imported from the daemon, which dstackctl must not import.
"""

OK = 0
# The operation failed: a daemon error, a conflict, a failed run.
FAILED = 1
# A usage error or an invalid value (click reports its own usage errors as 2).
USAGE = 2
# The daemon's socket is missing, refuses connections or denies permission.
UNREACHABLE = 3
# The pool, instance or run named in the command does not exist.
NOT_FOUND = 4
# Ctrl-C interrupted a command; shells report 128 + SIGINT for that.
INTERRUPTED = 130

_USAGE_ERROR_CODES = frozenset({"invalid_value", "invalid_request"})


def for_http_error(status: int, code: str | None) -> int:
    """Return the exit code for an HTTP error status and the daemon's error code."""
    if status == 400 or code in _USAGE_ERROR_CODES:
        return USAGE

    if status == 404 or code == "not_found":
        return NOT_FOUND

    return FAILED


def for_task_exit_status(exit_status: int) -> int:
    """Return the exit code that reports a task's exit status to the shell.

    A negative status means the task was killed by that signal; it becomes
    128 + the signal number, as shells report it. A code above 255 can not be
    passed on, so it becomes ``FAILED``.
    """
    code = 128 - exit_status if exit_status < 0 else exit_status

    return code if code <= 255 else FAILED
