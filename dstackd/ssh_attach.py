"""Dev environments and attach on SSH hosts: the run's script and the shell command.

On a host reached over SSH the run is a ``sh`` script under the run supervisor
of ``dstackd/ssh_runner.py``, so the host needs nothing beyond what that
supervisor needs. The script runs the init lines, writes ``ready`` to the
run's directory ``~/.dstackd/runs/<run id>/`` on the host, and then waits
until it is stopped or until no client was attached for the inactivity
duration.

``dstackctl attach`` logs in with OpenSSH and runs ``shell_command``. That
command waits for ``ready``, records its own pid as ``sessions/<pid>``, loads
the run's variables from the run's ``env`` file, enters the working
directory and execs the shell or the given command, which keeps that pid. The
run's script counts a session as attached while its pid is alive, so the
inactivity timer sees every attach, whichever client opened it. When the run
is stopped with SIGTERM, the script sends SIGHUP to the process group of each
session, which ends the attached shells as it does on a local instance.
"""

import shlex

from dstackd.runner import RunLaunch
from dstackd.ssh_runner import REMOTE_RUNS_DIR
from events.projection import Run

# The backends whose instances the daemon reaches with ``SshRunner``; it maps
# exactly these names to that runner.
SSH_BACKENDS = frozenset({"ssh", "aws"})

# How often the run's script checks its sessions, in seconds. The inactivity
# duration is therefore honoured to about this much.
SESSION_CHECK_INTERVAL_SECONDS = 1

# NOTE: an abort (SIGKILL at once) gives the script no chance to run its TERM
# trap, so attached shells on the host outlive an aborted dev environment.
_HOLD_SCRIPT = r"""
end_sessions() {
  for f in "$d/sessions"/*; do
    [ -e "$f" ] || continue
    p=${f##*/}
    kill -s HUP -- "-$p" 2>/dev/null || kill -s HUP "$p" 2>/dev/null || true
  done
}
trap 'end_sessions; exit 143' TERM
trap 'end_sessions; exit 129' HUP
: >"$d/ready"
say "ready; open a shell with 'dstackctl attach'"
idle_since=$(date +%s)
while :; do
  attached=0
  for f in "$d/sessions"/*; do
    [ -e "$f" ] || continue
    if kill -0 "${f##*/}" 2>/dev/null; then attached=1; else rm -f "$f"; fi
  done
  now=$(date +%s)
  if [ "$attached" = 1 ]; then
    idle_since=$now
  elif [ -n "$inactivity" ] && [ $((now - idle_since)) -ge "$inactivity" ]; then
    say "ends: no client was attached for ${inactivity}s"
    exit 0
  fi
  sleep @INTERVAL@
done
"""

_INIT_SCRIPT = r"""
say "running init"
set +e
/bin/sh -e -c @INIT@
s=$?
set -e
if [ "$s" -ne 0 ]; then
  say "init failed with status $s"
  exit "$s"
fi
"""

_SHELL_SCRIPT = r"""
waited=0
while [ ! -e "$d/ready" ] && [ ! -e "$d/exit_status" ]; do
  if [ ! -d "$d" ]; then
    echo "dstackd: run $run has no directory $d on this host" >&2
    exit 1
  fi
  if [ "$waited" = 0 ]; then
    echo "Waiting for the dev environment to finish its init..." >&2
    waited=1
  fi
  sleep 0.1
done
if [ -e "$d/exit_status" ]; then
  echo "dstackd: run $run ended; it can no longer be attached" >&2
  exit 1
fi
: >"$d/sessions/$$"
. "$d/env"
cd "$HOME"
if [ -n "$workdir" ]; then
  cd "$workdir" 2>/dev/null ||
    echo "dstackd: working directory $workdir does not exist on this host" >&2
fi
if [ "$#" -eq 0 ]; then
  set -- "${SHELL:-/bin/sh}"
fi
exec "$@"
"""


def remote_dir(run_id: str) -> str:
    """Return the run's directory on its host, relative to the user's home."""
    return f"{REMOTE_RUNS_DIR}/{run_id}"


def dev_environment_script(run: Run) -> str:
    """Build the ``sh`` script that is a dev environment's task on a host."""
    inactivity = run.spec.inactivity_duration
    if inactivity is None or inactivity == "off":
        inactivity = ""

    lines = [
        f'd="$HOME/{remote_dir(run.id)}"',
        f"inactivity={shlex.quote(str(inactivity))}",
        'rm -f "$d/ready"',
        'mkdir -p "$d/sessions"',
        'say() { echo "dstackd: dev environment $*"; }',
    ]
    script = "\n".join(lines) + "\n"
    if run.spec.init:
        init = shlex.quote("\n".join(run.spec.init))
        script += _INIT_SCRIPT.replace("@INIT@", init)

    interval = str(SESSION_CHECK_INTERVAL_SECONDS)

    return script + _HOLD_SCRIPT.replace("@INTERVAL@", interval)


def dev_environment_launch(launch: RunLaunch, run: Run) -> RunLaunch:
    """Turn a dev environment's launch into the script that holds it on a host."""
    import msgspec

    return msgspec.structs.replace(
        launch, argv=[], commands=[dev_environment_script(run)]
    )


def shell_command(run: Run) -> str:
    """Build the remote command line that opens a shell in ``run``.

    The argv of a command to run in place of the shell may be appended,
    quoted for ``sh``.
    """
    lines = [
        f'd="$HOME/{remote_dir(run.id)}"',
        f"run={shlex.quote(run.name)}",
        f"workdir={shlex.quote(run.spec.working_dir or '')}",
    ]
    script = "\n".join(lines) + _SHELL_SCRIPT

    return "sh -c " + shlex.quote(script) + " dstackd-attach"
