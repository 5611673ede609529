"""Run directories under the data dir: output logs, exit status, environment.

Each run gets ``<data dir>/runs/<run id>/``. The environment values a run was
submitted with live only in ``env.json`` there (mode 0600), never in the event
log, because they often carry tokens.
"""

import json
import os
from pathlib import Path

from dstackd import ssh_attach
from dstackd.attach import dev_environment_launch
from dstackd.runner import RunLaunch
from dstackd.ssh_attach import SSH_BACKENDS
from events.projection import Instance, Run

ENV_FILE = "env.json"
OUTPUT_FILE = "output.log"


class RunFiles:
    """Paths and files of runs below ``runs_dir``."""

    def __init__(self, runs_dir: Path) -> None:
        self.runs_dir = runs_dir

    def run_dir(self, run_id: str) -> Path:
        return self.runs_dir / run_id

    def log_path(self, run_id: str) -> Path:
        return self.run_dir(run_id) / OUTPUT_FILE

    def prepare(self, run_id: str, env: dict[str, str]) -> None:
        """Create the run's directory and store its environment, durably."""
        run_dir = self.run_dir(run_id)
        run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = run_dir / ENV_FILE
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w") as file:
            json.dump(env, file)
            file.flush()
            os.fsync(file.fileno())

        self.log_path(run_id).touch(mode=0o600)

    def read_env(self, run_id: str) -> dict[str, str]:
        try:
            with open(self.run_dir(run_id) / ENV_FILE) as file:
                env: dict[str, str] = json.load(file)
        except FileNotFoundError:
            return {}

        return env

    def launch_for(self, run: Run, instance: Instance) -> RunLaunch:
        """Describe how to start ``run`` on ``instance``.

        CPU ids and GPU indices come from a local instance's reservation; a
        remote runner takes the host from ``backend_data``.
        """
        data = instance.backend_data
        launch = RunLaunch(
            run_id=run.id,
            argv=list(run.spec.argv),
            commands=list(run.spec.commands),
            env=self.read_env(run.id),
            working_dir=run.spec.working_dir,
            cpu_ids=_parse_ids(data.get("cpu_ids", "")),
            gpu_indices=_parse_ids(data.get("gpu_indices", "")),
            uid=run.uid,
            gid=None,
            run_dir=str(self.run_dir(run.id)),
            backend_data=dict(data),
        )
        if run.spec.type == "dev-environment" and instance.backend in SSH_BACKENDS:
            return ssh_attach.dev_environment_launch(launch, run)

        if run.spec.type == "dev-environment":
            return dev_environment_launch(launch, run)

        return launch


def _parse_ids(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]
