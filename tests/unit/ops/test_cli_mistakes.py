"""Every user mistake through the real ``dstream`` entry point: one line, the right exit code.

Each case runs ``python -m ops.cli ...`` in a subprocess, in a folder holding the app files,
with no ``DSTREAM_*`` variable but those the case sets (and an empty dev home, so no dev
services are found), and checks the whole of stderr: the exact line (or a precise
pattern), no traceback, and the exit code (2: a usage error, 1: a runtime failure). A
command that needs Kafka gets ``127.0.0.1:1`` and fails before connecting; the one runtime
failure asks Redis at ``127.0.0.1:1``, which refuses at once.
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from contextlib import redirect_stderr
from pathlib import Path

import pytest

from ops.cli import build_parser, warn_unknown_env
from ops.config import known_env_names

ROOT = Path(__file__).resolve().parents[3]

#: App files the cases use, by name.
APPS = {
    "ok.py": "def build(ssc):\n    ssc.queue_stream([[1]]).pprint()\n",
    "bad_syntax.py": "def build(ssc):\n    x = (1,\n",
    "missing_import.py": (
        "import json\nimport nosuch_dstream_module\n\n\ndef build(ssc):\n    pass\n"
    ),
    "build_raises.py": "def helper(n):\n    return 10 // n\n\n\ndef build(ssc):\n    helper(0)\n",
    "bad_window.py": (
        "def build(ssc):\n    s = ssc.queue_stream([[1]])\n    s.window('1500ms').pprint()\n"
    ),
    "no_build.py": "X = 1\n",
}
FORMS = '"500ms", "1s", "2m", "1h" or a number of seconds'
NO_KAFKA = ["--kafka-bootstrap", "127.0.0.1:1"]


def dstream(
    folder: Path, *argv: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``dstream *argv`` in *folder*, with only the ``DSTREAM_*`` variables of *env*."""
    base = {k: v for k, v in os.environ.items() if not k.upper().startswith("DSTREAM_")}
    base["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), base.get("PYTHONPATH")]))
    base["DSTREAM_DEV_HOME"] = str(folder / "dev-home")
    base.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "ops.cli", *argv],
        cwd=folder,
        env=base,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture(scope="module")
def apps(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("apps")
    for name, text in APPS.items():
        (folder / name).write_text(text)
    return folder


#: (id, argv, environment, the whole of stderr as a regex, exit code)
MISTAKES: list[tuple[str, list[str], dict[str, str], str, int]] = [
    (
        "syntax error in the app",
        ["run", "bad_syntax.py"],
        {},
        re.escape("dstream: bad_syntax.py:2: SyntaxError: '(' was never closed"),
        2,
    ),
    (
        "missing import in the app",
        ["run", "missing_import.py"],
        {},
        re.escape(
            "dstream: missing_import.py:2: ModuleNotFoundError: No module named "
            "'nosuch_dstream_module' (is it installed in this environment? is the name right?)"
        ),
        2,
    ),
    (
        "exception inside build(): the raising frame's line",
        ["run", "--app", "build_raises.py"],
        {},
        re.escape(
            "dstream: build_raises.py:2: build(ssc) raised ZeroDivisionError: "
            "integer division or modulo by zero"
        ),
        2,
    ),
    (
        "graph error inside build()",
        ["run", "bad_window.py"],
        {},
        r"dstream: bad_window\.py:3: window: [^\n]*window=1\.5s[^\n]*",
        2,
    ),
    (
        "app file without build",
        ["run", "no_build.py"],
        {},
        re.escape("dstream: no_build.py: must define build(ssc: StreamingContext) -> None"),
        2,
    ),
    (
        "app file missing",
        ["run", "nope.py"],
        {},
        re.escape("dstream: nope.py: no such app file"),
        2,
    ),
    (
        "verify: app file with a syntax error",
        ["verify", "--app", "bad_syntax.py", *NO_KAFKA],
        {},
        re.escape("dstream: bad_syntax.py:2: SyntaxError: '(' was never closed"),
        2,
    ),
    (
        "negative --batch-interval",
        ["run", "ok.py", "--batch-interval", "-1"],
        {},
        re.escape("dstream: batch interval (--batch-interval): must be positive, got -1"),
        2,
    ),
    (
        "negative DSTREAM_BATCH_INTERVAL",
        ["settings"],
        {"DSTREAM_BATCH_INTERVAL": "-500ms"},
        re.escape("dstream: batch interval (DSTREAM_BATCH_INTERVAL): must be positive, got -0.5"),
        2,
    ),
    (
        "unreadable duration flag",
        ["run", "--app", "ok.py", "--batch-interval", "1sec"],
        {},
        re.escape(
            "dstream: batch interval (--batch-interval): cannot read '1sec' as a duration; "
            f"use {FORMS}"
        ),
        2,
    ),
    (
        "unreadable duration setting",
        ["settings"],
        {"DSTREAM_HEARTBEAT_INTERVAL": "fast"},
        re.escape(
            "dstream: heartbeat interval (DSTREAM_HEARTBEAT_INTERVAL): cannot read 'fast' as "
            f"a duration; use {FORMS}"
        ),
        2,
    ),
    (
        "two bad settings: one line each",
        ["settings", "--num-partitions", "0"],
        {"DSTREAM_LEASE_SECONDS": "10m"},
        re.escape("dstream: num partitions (--num-partitions): must be at least 1, got 0")
        + r"\n"
        + re.escape(
            "dstream: lease seconds (DSTREAM_LEASE_SECONDS): must be between 1 s and 300 s, "
            "got 600 s"
        ),
        2,
    ),
    (
        "unknown --log-level",
        ["run", "ok.py", "--log-level", "verbose"],
        {},
        re.escape(
            "dstream: run: argument --log-level: invalid choice: 'verbose' (choose from "
            "'debug', 'info', 'warning', 'error') (see dstream run --help)"
        ),
        2,
    ),
    (
        "unknown DSTREAM_LOG_LEVEL",
        ["settings"],
        {"DSTREAM_LOG_LEVEL": "verbose"},
        re.escape(
            "dstream: log level (DSTREAM_LOG_LEVEL): must be one of debug, info, warning, "
            "error, got 'verbose'"
        ),
        2,
    ),
    (
        "unknown flag after run: run's error",
        ["run", "ok.py", "--bogus"],
        {},
        re.escape("dstream: run: unrecognized arguments: --bogus (see dstream run --help)"),
        2,
    ),
    (
        "run without an app",
        ["run", "--batch-interval", "1s"],
        {},
        re.escape(
            "dstream: run: the app file is required: give it as APP or --app APP "
            "(see dstream run --help)"
        ),
        2,
    ),
    (
        "run with two apps",
        ["run", "ok.py", "--app", "build_raises.py"],
        {},
        re.escape(
            "dstream: run: two app files given: give it as APP or --app APP "
            "(see dstream run --help)"
        ),
        2,
    ),
    (
        "verify without --app: no default inside the repository",
        ["verify", *NO_KAFKA],
        {},
        re.escape(
            "dstream: verify: the following arguments are required: --app "
            "(see dstream verify --help)"
        ),
        2,
    ),
    (
        "unreadable duration of produce",
        ["produce", "--topic", "t", "--duration", "10 sec", *NO_KAFKA],
        {},
        re.escape(
            "dstream: produce: argument --duration: cannot read '10 sec' as a duration; "
            f"use {FORMS} (see dstream produce --help)"
        ),
        2,
    ),
    (
        "unknown command",
        ["rn", "ok.py"],
        {},
        r"dstream: argument COMMAND: invalid choice: 'rn' \(choose from [^\n]*'run'[^\n]*\) "
        r"\(see dstream --help\)",
        2,
    ),
    (
        "runtime failure: Redis does not answer",
        ["reset", "--app-id", "a", "--redis-url", "redis://127.0.0.1:1/0", *NO_KAFKA],
        {},
        r"dstream: ConnectionError: [^\n]*127\.0\.0\.1:1[^\n]* \(--debug shows the traceback\)",
        1,
    ),
]


@pytest.mark.parametrize(
    ("argv", "env", "stderr", "code"),
    [pytest.param(*case[1:], id=case[0]) for case in MISTAKES],
)
def test_a_mistake_gives_one_line_and_its_exit_code(
    apps: Path, argv: list[str], env: dict[str, str], stderr: str, code: int
) -> None:
    res = dstream(apps, *argv, env=env)
    assert "Traceback" not in res.stderr
    assert re.fullmatch(stderr, res.stderr.rstrip("\n")), res.stderr
    assert res.returncode == code, res.stderr


@pytest.mark.parametrize(
    ("argv", "env"),
    [
        (["--debug", "run", "build_raises.py"], {}),
        (["run", "build_raises.py", "--debug"], {}),
        (["run", "build_raises.py"], {"DSTREAM_LOG_LEVEL": "DEBUG"}),
        (["run", "build_raises.py", "--log-level", "debug"], {}),
    ],
    ids=["--debug first", "--debug last", "DSTREAM_LOG_LEVEL=debug", "--log-level debug"],
)
def test_debug_shows_the_traceback_then_the_line(
    apps: Path, argv: list[str], env: dict[str, str]
) -> None:
    res = dstream(apps, *argv, env=env)
    assert res.returncode == 2
    lines = res.stderr.rstrip("\n").splitlines()
    assert lines[0] == "Traceback (most recent call last):"
    assert 'build_raises.py", line 2, in helper' in res.stderr
    assert lines[-1] == (
        "dstream: build_raises.py:2: build(ssc) raised ZeroDivisionError: "
        "integer division or modulo by zero"
    )


def _settings(apps: Path, *argv: str, env: dict[str, str] | None = None) -> dict[str, object]:
    res = dstream(apps, "settings", *argv, env=env)
    assert res.returncode == 0, res.stderr
    assert res.stderr == ""
    return dict(json.loads(res.stdout))


def test_durations_in_flags_and_settings(apps: Path) -> None:
    assert _settings(apps, "--batch-interval", "1s")["batch_interval"] == 1.0
    assert _settings(apps, "--batch-interval", "2m")["batch_interval"] == 120.0
    assert _settings(apps, "--batch-interval", "0.25")["batch_interval"] == 0.25
    env = {
        "DSTREAM_BATCH_INTERVAL": "500ms",
        "DSTREAM_LEASE_SECONDS": "1500ms",
        "DSTREAM_HEARTBEAT_INTERVAL": "250ms",
        "DSTREAM_PEER_DEADLINE": "100ms",
        "DSTREAM_REDIS_WAIT_TIMEOUT": "2s",
        "DSTREAM_TASK_RETRY_ALERT_SECONDS": "1h",
    }
    s = _settings(apps, env=env)
    assert (s["batch_interval"], s["lease_seconds"], s["heartbeat_interval"]) == (0.5, 1.5, 0.25)
    assert (s["peer_deadline"], s["redis_wait_timeout"]) == (0.1, 2.0)
    assert s["task_retry_alert_seconds"] == 3600.0
    # a flag wins over its variable
    assert _settings(apps, "--batch-interval", "2s", env=env)["batch_interval"] == 2.0


def test_a_misspelled_variable_is_reported_once_with_the_closest_name(apps: Path) -> None:
    res = dstream(apps, "settings", env={"DSTREAM_BATCH_INTERVL": "2s", "DSTREAM_ZQXJ": "1"})
    assert res.returncode == 0, res.stderr
    assert res.stderr.splitlines() == [
        "dstream: unknown setting DSTREAM_BATCH_INTERVL (did you mean DSTREAM_BATCH_INTERVAL?)",
        "dstream: unknown setting DSTREAM_ZQXJ (ignored)",
    ]
    assert json.loads(res.stdout)["batch_interval"] == 1.0  # ignored, as said


def test_variables_read_outside_the_settings_are_not_reported(apps: Path) -> None:
    env = {
        "DSTREAM_LOG_LEVEL": "warning",
        "DSTREAM_FAULT_SLOW": "3",
        "DSTREAM_FAULT_DIR": str(apps),
        "DSTREAM_HELM": "/nonexistent/helm",
    }
    assert _settings(apps, env=env)["batch_interval"] == 1.0


def test_every_variable_the_code_reads_is_known() -> None:
    """A ``DSTREAM_*`` name in the code that the check does not know would be reported as
    a misspelling: every one must be a setting or in ``ENV_OUTSIDE_SETTINGS``.
    """
    pattern = re.compile(r"DSTREAM_[A-Z0-9_]*[A-Z0-9]")
    found: set[str] = set()
    for folder in ("ops", "engine", "state", "ingest", "tests/apps"):
        for path in (ROOT / folder).rglob("*"):
            if path.suffix in (".py", ".sh") and path.is_file():
                found.update(pattern.findall(path.read_text(errors="replace")))
    found -= {"DSTREAM_TLS"}  # the prefix of DSTREAM_TLS_CERT/KEY/CA in messages
    assert found, "the scan found nothing: wrong folders?"
    assert sorted(found - known_env_names()) == []


def test_the_warning_drops_the_variable_so_children_do_not_repeat_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DSTREAM_SECRT", "x")
    err = io.StringIO()
    with redirect_stderr(err):
        warn_unknown_env()
        warn_unknown_env()  # a child process: nothing left to report
    assert (
        err.getvalue() == "dstream: unknown setting DSTREAM_SECRT (did you mean DSTREAM_SECRET?)\n"
    )
    assert "DSTREAM_SECRT" not in os.environ


def test_produce_takes_kafka_bootstrap_and_still_the_old_bootstrap(
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = ["produce", "--topic", "t", "--count", "1"]
    assert build_parser().parse_args([*argv, "--kafka-bootstrap", "a:1"]).kafka_bootstrap == "a:1"
    assert build_parser().parse_args([*argv, "--bootstrap", "b:2"]).kafka_bootstrap == "b:2"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["produce", "--help"])
    shown = capsys.readouterr().out
    assert "--kafka-bootstrap" in shown
    assert "--bootstrap " not in shown  # the old name is hidden


def test_kubernetes_service_links_are_no_misspellings() -> None:
    from ops.config import unknown_env

    env = {
        "DSTREAM_FLEET_COORDINATOR_SERVICE_HOST": "10.0.0.1",
        "DSTREAM_FLEET_COORDINATOR_SERVICE_PORT_RPC": "7070",
        "DSTREAM_FLEET_COORDINATOR_PORT": "tcp://10.0.0.1:7070",
        "DSTREAM_FLEET_COORDINATOR_PORT_7070_TCP_ADDR": "10.0.0.1",
        "DSTREAM_RCP_PORT": "7071",
    }
    assert unknown_env(env) == [("DSTREAM_RCP_PORT", "DSTREAM_RPC_PORT")]


@pytest.mark.parametrize(("unreachable", "code"), [(False, 2), (True, 1)])
def test_a_config_error_from_an_unanswering_service_is_a_runtime_failure(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    unreachable: bool,
    code: int,
) -> None:
    """A refused topic creation will not fix itself (2); Kafka not answering may (1)."""
    from ops import cli, cli_roles
    from ops.topics import TopicError

    def refuse(_args: object) -> int:
        raise TopicError("cannot create output topic 'out': ...", "out", unreachable=unreachable)

    monkeypatch.setattr(cli_roles, "cmd_settings", refuse)
    # set, so that main looks for no dev services (and writes nothing to this environment)
    monkeypatch.setenv("DSTREAM_KAFKA_BOOTSTRAP", "127.0.0.1:1")
    monkeypatch.setenv("DSTREAM_REDIS_URL", "redis://127.0.0.1:1/0")
    assert cli.main(["settings"]) == code
    assert capsys.readouterr().err == "dstream: cannot create output topic 'out': ...\n"
