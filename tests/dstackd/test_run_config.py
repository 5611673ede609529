"""Run configuration files and profiles: parsing, errors with file, field path
and line, merging with flags, and the RunSpec built from them."""

import pytest

from dstackd import api
from dstackd.errors import InvalidRequestError, NotFoundError
from dstackd.run_config import RunConfigError, parse_profiles, parse_run_config
from dstackd.submission import build_run_spec, resolve_request
from events.event_types import ReadinessProbe, RetryPolicy
from events.model import GpuSpec, Range

PATH = "/src/app/.dstack.yml"

# (file text, field path, line, a part of the problem)
INVALID_FILES = [
    pytest.param("", "", 1, "the file is empty", id="empty"),
    pytest.param("type: [task\n", "", 2, "invalid YAML", id="bad-yaml"),
    pytest.param(
        "- a\n- b\n", "", 1, "expected a run configuration mapping", id="list"
    ),
    pytest.param("name: x\n", "", 1, "missing field type", id="no-type"),
    pytest.param("type: job\n", "type", 1, "invalid type 'job'", id="bad-type"),
    pytest.param(
        "type: task\ncommands: [a]\nimage: python:3.11\n",
        "image",
        3,
        "not supported: runs are processes on the instance, not containers",
        id="image",
    ),
    pytest.param(
        "type: task\ncommands: [a]\ndocker: true\n",
        "docker",
        3,
        "not containers",
        id="docker",
    ),
    pytest.param(
        "type: task\ncommands: [a]\nregistry_auth: {}\n",
        "registry_auth",
        3,
        "not containers",
        id="registry-auth",
    ),
    pytest.param(
        "type: dev-environment\nide: vscode\n",
        "ide",
        2,
        "IDEs are not supported",
        id="ide",
    ),
    pytest.param(
        "type: task\ncommands: [a]\ncolour: red\n",
        "colour",
        3,
        "unknown field colour; expected one of: type, name",
        id="unknown",
    ),
    pytest.param(
        "type: task\ncommands: [a]\nport: 80\n",
        "port",
        3,
        "field port applies to type service, not to task",
        id="port-on-task",
    ),
    pytest.param(
        "type: service\nport: 80\ncommands: [a]\ninit: [b]\n",
        "init",
        4,
        "applies to type dev-environment, not to service",
        id="init-on-service",
    ),
    pytest.param(
        "type: task\ncommands: [a]\ncommands: [b]\n",
        "commands",
        3,
        "duplicate field",
        id="duplicate",
    ),
    pytest.param(
        "type: task\ncommands: echo hi\n",
        "commands",
        2,
        "expected a list of shell lines",
        id="commands-string",
    ),
    pytest.param(
        "type: task\ncommands:\n  - a\n  - {b: c}\n",
        "commands[1]",
        4,
        "expected a shell line, got a mapping",
        id="command-mapping",
    ),
    pytest.param(
        "type: task\nname: Bad Name\ncommands: [a]\n",
        "name",
        2,
        "invalid name 'Bad Name'",
        id="bad-name",
    ),
    pytest.param(
        "type: task\ncommands: [a]\nenv:\n  1X: y\n",
        "env.1X",
        4,
        "invalid environment variable name '1X'",
        id="bad-env-name",
    ),
    pytest.param(
        "type: task\ncommands: [a]\nenv:\n  - OK=1\n  - 9=2\n",
        "env[1]",
        5,
        "invalid environment variable name '9'",
        id="bad-env-item",
    ),
    pytest.param(
        "type: task\ncommands: [a]\nresources:\n  gpu: A100:80XB\n",
        "resources.gpu",
        4,
        "invalid gpu 'A100:80XB'",
        id="bad-gpu",
    ),
    pytest.param(
        "type: task\ncommands: [a]\nresources:\n  cpu: 8..2\n",
        "resources.cpu",
        4,
        "the lower bound is above the upper bound",
        id="reversed-cpu",
    ),
    pytest.param(
        "type: task\ncommands: [a]\nresources:\n  memory: 8XB\n",
        "resources.memory",
        4,
        "invalid memory '8XB'",
        id="bad-memory",
    ),
    pytest.param(
        "type: task\ncommands: [a]\nresources:\n  disk: {size: lots}\n",
        "resources.disk",
        4,
        "invalid disk 'lots'",
        id="bad-disk",
    ),
    pytest.param(
        "type: task\ncommands: [a]\nresources:\n  shm_size: 8GB\n",
        "resources.shm_size",
        4,
        "no /dev/shm size",
        id="shm-size",
    ),
    pytest.param(
        "type: task\ncommands: [a]\nspot_policy: sometimes\n",
        "spot_policy",
        3,
        "invalid spot_policy 'sometimes': expected 'spot', 'on-demand' or 'auto'",
        id="bad-spot",
    ),
    pytest.param(
        "type: task\ncommands: [a]\nmax_price: cheap\n",
        "max_price",
        3,
        "invalid max_price 'cheap'",
        id="bad-price",
    ),
    pytest.param(
        "type: task\ncommands: [a]\nidle_duration: 5x\n",
        "idle_duration",
        3,
        "invalid idle_duration '5x'",
        id="bad-idle",
    ),
    pytest.param(
        "type: task\ncommands: [a]\nmax_duration: 1H\n",
        "max_duration",
        3,
        "units are lower case (1h)",
        id="upper-unit",
    ),
    pytest.param(
        "type: task\ncommands: [a]\ncreation_policy: always\n",
        "creation_policy",
        3,
        "expected reuse or reuse-or-create",
        id="bad-policy",
    ),
    pytest.param(
        "type: task\ncommands: [a]\nretry:\n  on_events: [error, crash]\n",
        "retry.on_events[1]",
        4,
        "invalid retry event 'crash'",
        id="bad-retry-event",
    ),
    pytest.param(
        "type: task\ncommands: [a]\nretry:\n  duration: soon\n",
        "retry.duration",
        4,
        "invalid retry.duration 'soon'",
        id="bad-retry-duration",
    ),
    pytest.param(
        "type: task\ncommands: [a]\nretry: 3\n",
        "retry",
        3,
        "expected true, false or a mapping",
        id="retry-number",
    ),
    pytest.param(
        'type: task\ncommands: [a]\nports: ["8080:80"]\n',
        "ports[0]",
        3,
        "give one number",
        id="port-mapping",
    ),
    pytest.param(
        "type: service\ncommands: [a]\nport: 70000\n",
        "port",
        3,
        "expected a port number from 1 to 65535",
        id="port-range",
    ),
    pytest.param(
        "type: service\ncommands: [a]\nport: 80\nprobe:\n  path: health\n",
        "probe.path",
        5,
        "expected a path starting with /",
        id="probe-path",
    ),
    pytest.param(
        "type: service\ncommands: [a]\nport: 80\nprobe:\n  interval: 0\n",
        "probe.interval",
        5,
        "a duration of at least 1s",
        id="probe-interval",
    ),
    pytest.param(
        "type: service\ncommands: [a]\nport: 80\nmax_restarts: -1\n",
        "max_restarts",
        4,
        "expected an integer from 0 to 1000",
        id="negative-restarts",
    ),
    pytest.param(
        "type: dev-environment\ninactivity_duration: [1]\n",
        "inactivity_duration",
        2,
        "expected a duration, got a list",
        id="inactivity-list",
    ),
    pytest.param(
        "type: task\ncommands: [echo]\nenv: " + "[" * 5000 + "]" * 5000 + "\n",
        "",
        1,
        "nested too deeply",
        id="deep-nesting",
    ),
]


@pytest.mark.parametrize(("text", "field", "line", "problem"), INVALID_FILES)
def test_invalid_file_names_field_and_line(
    text: str, field: str, line: int, problem: str
) -> None:
    with pytest.raises(RunConfigError) as caught:
        parse_run_config(PATH, text)

    error = caught.value
    assert error.path == PATH
    assert error.field == field
    assert error.line == line
    assert problem in error.problem
    assert str(error).startswith(f"{PATH}:{line}: ")


def test_service_file_builds_spec() -> None:
    text = """
type: service
name: web
port: 8000
probe: {path: /health, interval: 2s, timeout: 1s}
commands:
  - python -m http.server 8000
env:
  MODE: prod
resources:
  gpu: {name: [a100, H100], memory: 40GB.., count: 1}
  cpu: {min: 2}
  memory: 8GB..
spot_policy: auto
max_price: 1.5
retry:
  on_events: [error]
  duration: 10m
"""
    request = api.SubmitRun(config=api.ConfigFile(PATH, text))

    spec = build_run_spec(resolve_request(request))

    assert spec.type == "service"
    assert spec.port == 8000
    assert spec.probe == ReadinessProbe(path="/health", interval=2, timeout=1)
    assert spec.max_restarts == 3
    assert spec.commands == ("python -m http.server 8000",)
    assert spec.env_names == ("MODE",)
    assert spec.working_dir == "/src/app/"
    assert spec.requirements.gpu == GpuSpec(
        ("A100", "H100"), Range(40, None), Range(1, 1)
    )
    assert spec.requirements.cpu == Range(2, None)
    assert spec.requirements.spot_policy == "auto"
    assert spec.requirements.max_price == 1.5
    assert spec.retry == RetryPolicy(on_events=("error",), duration=600)


def test_off_and_yaml_booleans_stay_text() -> None:
    text = "type: task\ncommands: ['true']\nidle_duration: off\nmax_duration: 1h30m\n"

    config = parse_run_config(PATH, text)

    assert config.request.idle_duration == "off"
    assert config.request.max_duration == "1h30m"


def test_flags_override_file_fields() -> None:
    text = (
        "type: task\nname: from-file\ncommands: [a]\nworking_dir: sub\n"
        "env: {A: file, B: file}\nresources: {cpu: 2, memory: 4GB}\n"
    )
    request = api.SubmitRun(
        config=api.ConfigFile(PATH, text),
        name="from-flag",
        env={"B": "flag"},
        resources=api.ResourceArgs(cpu="8"),
        argv=["python", "x.py"],
    )

    resolved = resolve_request(request)

    assert resolved.name == "from-flag"
    assert resolved.env == {"A": "file", "B": "flag"}
    assert resolved.resources.cpu == "8"
    assert resolved.resources.memory == "4GB"
    assert resolved.argv == ["python", "x.py"]
    assert resolved.commands == []
    assert resolved.working_dir == "/src/app/sub"


def test_bare_env_name_needs_flag() -> None:
    text = "type: task\ncommands: [a]\nenv:\n  - TOKEN\n"
    request = api.SubmitRun(config=api.ConfigFile(PATH, text))

    with pytest.raises(RunConfigError, match="pass it with -e TOKEN") as caught:
        resolve_request(request)

    assert caught.value.line == 4
    assert resolve_request(
        api.SubmitRun(config=api.ConfigFile(PATH, text), env={"TOKEN": "t"})
    ).env == {"TOKEN": "t"}


PROFILES = """
profiles:
  - name: cheap
    spot_policy: auto
    max_price: 0.5
    pool: spot-pool
    idle_duration: 10m
  - name: main
    default: true
    pool: main-pool
"""


def test_default_profile_applies_under_file_and_flags() -> None:
    request = api.SubmitRun(
        argv=["true"], profiles=[api.ConfigFile("/p/profiles.yml", PROFILES)]
    )

    resolved = resolve_request(request)

    assert resolved.pool == "main-pool"
    assert resolved.resources.spot_policy is None


def test_named_profile_sets_defaults() -> None:
    text = "type: task\ncommands: [a]\nmax_price: 0.7\n"
    request = api.SubmitRun(
        config=api.ConfigFile(PATH, text),
        profiles=[api.ConfigFile("/p/profiles.yml", PROFILES)],
        profile="cheap",
    )

    resolved = resolve_request(request)

    assert resolved.pool == "spot-pool"
    assert resolved.idle_duration == "10m"
    assert resolved.resources.spot_policy == "auto"
    assert resolved.resources.max_price == "0.7"


def test_first_profiles_file_wins() -> None:
    project = "profiles:\n  - name: main\n    pool: project-pool\n"
    request = api.SubmitRun(
        argv=["true"],
        profiles=[
            api.ConfigFile("/w/.dstack/profiles.yml", project),
            api.ConfigFile("/home/u/.dstack/profiles.yml", PROFILES),
        ],
        profile="main",
    )

    assert resolve_request(request).pool == "project-pool"


def test_unknown_profile_lists_known_ones() -> None:
    request = api.SubmitRun(
        argv=["true"],
        profiles=[api.ConfigFile("/p/profiles.yml", PROFILES)],
        profile="gpu",
    )

    with pytest.raises(NotFoundError, match="profiles found: cheap, main"):
        resolve_request(request)


@pytest.mark.parametrize(
    ("text", "line", "problem"),
    [
        pytest.param("profiles:\n  - pool: x\n", 2, "missing field name", id="no-name"),
        pytest.param(
            "profiles:\n  - name: a\n  - name: a\n",
            3,
            "duplicate profile name",
            id="dup",
        ),
        pytest.param(
            "profiles:\n  - name: a\n    default: true\n"
            "  - name: b\n    default: true\n",
            4,
            "a second profile marked default; the first is on line 2",
            id="two-defaults",
        ),
        pytest.param(
            "profiles:\n  - name: a\n    image: x\n", 3, "not supported", id="image"
        ),
        pytest.param(
            "profiles:\n  - name: a\n    max_price: free\n",
            3,
            "invalid max_price",
            id="price",
        ),
    ],
)
def test_invalid_profiles_file(text: str, line: int, problem: str) -> None:
    with pytest.raises(RunConfigError) as caught:
        parse_profiles("/p/profiles.yml", text)

    assert caught.value.line == line
    assert problem in caught.value.problem


@pytest.mark.parametrize(
    ("request_fields", "problem"),
    [
        pytest.param({"type": "service", "argv": ["a"]}, "needs a port", id="no-port"),
        pytest.param(
            {"type": "task", "argv": ["a"], "port": 80},
            "port applies to type service",
            id="port-on-task",
        ),
        pytest.param(
            {"type": "dev-environment", "argv": ["a"]},
            "runs no command",
            id="dev-command",
        ),
        pytest.param(
            {"type": "task", "argv": ["a"], "init": ["b"]},
            "init applies to type dev-environment",
            id="init-on-task",
        ),
        pytest.param({"type": "batch", "argv": ["a"]}, "invalid run type", id="type"),
    ],
)
def test_spec_rejects_fields_of_other_types(
    request_fields: dict[str, object], problem: str
) -> None:
    with pytest.raises(InvalidRequestError, match=problem):
        build_run_spec(api.SubmitRun(**request_fields))  # type: ignore[arg-type]


def test_retry_true_covers_every_event() -> None:
    text = "type: task\ncommands: [a]\nretry: true\n"
    config = parse_run_config(PATH, text)

    spec = build_run_spec(
        resolve_request(api.SubmitRun(config=api.ConfigFile(PATH, text)))
    )

    assert config.request.retry == api.RetryArgs()
    assert spec.retry == RetryPolicy()
