"""The ``inferno`` command as a user runs it: a real subprocess each time."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import threading
import time
import tomllib
from pathlib import Path

import pytest

from .conftest import INFERNO, run_inferno

SLOW_PROTOCOL = """
import asyncio
from inferno.kernel import Protocol

class Slow(Protocol):
    '''Holds one request in flight for a second, as a client would.'''

    async def start(self):
        self.task = asyncio.create_task(self.one_request())

    async def one_request(self):
        async with self.context.kernel.admit():
            self.log.info("request admitted")
            await asyncio.sleep(1.0)
            (self.context.data_dir / "finished").write_text("yes")

    async def stop(self):
        await self.task
"""

COMMANDS = """
import click
from inferno.kernel import hookimpl
from inferno.kernel.cli import CliState

@click.command()
def hello():
    '''Say which profile is in force.'''
    state = click.get_current_context().find_object(CliState)
    drain = state.kernel().config["kernel"]["drain_timeout"]
    click.echo(f"hello from {state.profile}, drain={drain}")

@hookimpl
def inferno_cli_commands():
    return [hello]
"""


def edge_profile(folder: Path, name: str, tables: str) -> Path:
    """A profile file that extends edge with ``tables`` (TOML text)."""
    path = folder / f"{name}.toml"
    path.write_text(f'extends = "edge"\n{tables}')
    return path


class Server:
    """``inferno`` running in the background, its stderr read line by line."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        # edge serves HTTP on 8080: a free port instead, so that tests never collide
        env = {"INFERNO_PROTOCOLS__HTTP__PORT": "0", **(env or {})}
        self.proc = subprocess.Popen([str(INFERNO), *args], stderr=subprocess.PIPE, text=True,
                                     stdout=subprocess.DEVNULL, env={**os.environ, **env})
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.put(line)

    def wait_for(self, text: str, timeout: float = 20) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                break
            self.seen.append(line)
            if text in line:
                return line
        raise AssertionError(f"{text!r} not seen; stderr so far:\n{''.join(self.seen)}")

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 5) -> tuple[int, float]:
        started = time.monotonic()
        self.proc.send_signal(signum)
        code = self.proc.wait(timeout)
        return code, time.monotonic() - started

    def signal_after(self, text: str, signum: int = signal.SIGTERM) -> tuple[int, float]:
        """Wait for ``text`` on stderr, send ``signum``, return the exit code and the wait."""
        try:
            self.wait_for(text)
            return self.stop(signum)
        finally:
            self.proc.kill()

    def rest(self) -> str:
        while not self.lines.empty():
            self.seen.append(self.lines.get())
        return "".join(self.seen)


def test_edge_starts_and_sigterm_stops_it_with_exit_0_within_5_seconds():
    server = Server("--profile", "edge")
    code, took = server.signal_after("ready", signal.SIGTERM)
    assert code == 0
    assert took < 5
    assert "stopped" in server.rest()


def test_protocol_option_serves_only_the_named_protocols():
    shown = run_inferno("--profile", "enterprise", "--protocol", "websocket", "profile", "show")
    assert shown.returncode == 0, shown.stderr
    protocols = tomllib.loads(shown.stdout)["protocols"]
    assert protocols["http"]["host"] == "0.0.0.0"  # the table stays ...
    assert protocols["http"]["enabled"] is False  # ... switched off
    assert protocols["websocket"].get("enabled", True) is True
    unknown = run_inferno("--profile", "edge", "--protocol", "carrier-pigeon", "profile", "show")
    assert unknown.returncode == 1
    assert "carrier-pigeon" in unknown.stderr


def test_sigint_also_stops_gracefully():
    code, _ = Server("serve").signal_after("ready", signal.SIGINT)  # edge is the default
    assert code == 0


def test_sigterm_drains_an_inflight_request_before_exiting(installed, tmp_path):
    installed("inferno-slow", {"inferno.protocols": {"slow": "fixture_slow:Slow"}},
              {"fixture_slow": SLOW_PROTOCOL})
    profile = edge_profile(tmp_path, "slow", '[protocols.slow]\n')
    server = Server("--profile", str(profile))
    code, took = server.signal_after("request admitted", signal.SIGTERM)
    assert code == 0
    assert "draining" in server.rest()
    assert (tmp_path / "data" / "protocols" / "slow" / "finished").read_text() == "yes"
    assert took >= 0.5  # it really waited for the request


def test_a_profile_naming_a_plugin_that_cannot_load_exits_non_zero_naming_it(installed,
                                                                              tmp_path):
    installed("inferno-broken", {"inferno.protocols": {"broken": "fixture_nope:Thing"}},
              {"fixture_nope": "import not_a_real_dependency\n"})
    profile = edge_profile(tmp_path, "broken", '[protocols.broken]\n')
    result = run_inferno("--profile", str(profile))
    assert result.returncode == 1
    assert "protocols.broken" in result.stderr
    assert "not_a_real_dependency" in result.stderr


def test_a_plugin_that_fails_to_start_exits_non_zero_naming_it(installed, tmp_path):
    installed("inferno-busy", {"inferno.protocols": {"busy": "fixture_busy:Busy"}},
              {"fixture_busy": "from inferno.kernel import Protocol\n"
                               "class Busy(Protocol):\n"
                               "    async def start(self): raise OSError('address in use')\n"
                               "    async def stop(self): pass\n"})
    profile = edge_profile(tmp_path, "busy", '[protocols.busy]\n')
    result = run_inferno("--profile", str(profile))
    assert result.returncode == 1
    assert "plugin 'busy': failed to start: OSError: address in use" in result.stderr


def test_plugins_list_shows_builtins_with_distribution_and_enabled_state():
    result = run_inferno("plugins", "list", "--json")
    assert result.returncode == 0, result.stderr
    rows = {row["name"]: row for row in json.loads(result.stdout)}
    assert rows["log"]["kind"] == "exporters"
    assert rows["log"]["distribution"] == "inferno"
    assert rows["log"]["enabled"] is True
    disabled = run_inferno("plugins", "list", "--set", "exporters.log.enabled=false")
    table = {line.split()[0]: line.split() for line in disabled.stdout.splitlines()}
    assert table["log"][-1] == "false"
    assert table["gguf"][-1] == "true"


def test_plugins_info_shows_hooks_and_config_keys():
    result = run_inferno("plugins", "info", "log")
    assert result.returncode == 0, result.stderr
    assert "inferno_config_spec" in result.stdout
    assert 'level = "info"' in result.stdout
    assert "[exporters.log]" in result.stdout
    missing = run_inferno("plugins", "info", "nonesuch")
    assert missing.returncode == 1
    assert "no installed plugin named 'nonesuch'" in missing.stderr


def test_shipped_profiles_validate_and_are_listed():
    listing = run_inferno("profile", "list")
    shipped = {line.split()[0] for line in listing.stdout.splitlines()[1:]}
    assert {"base", "edge", "enterprise"} <= shipped
    for name in sorted(shipped):
        result = run_inferno("profile", "validate", name)
        assert result.returncode == 0, result.stderr
        assert f"profile {name} is valid" in result.stdout


def test_validate_prints_all_three_mistakes_and_exits_1(tmp_path):
    profile = tmp_path / "three.toml"
    profile.write_text('extends = "edge"\n[kernel]\ndrain_timeout = -1\n'
                       '[logging]\nformat = "xml"\n[exporters.log]\ntopic = ["x"]\n')
    result = run_inferno("profile", "validate", str(profile))
    assert result.returncode == 1
    assert "3 problems" in result.stderr
    for key in ("kernel.drain_timeout", "logging.format", "exporters.log.topic"):
        assert f"{key}: " in result.stderr
    assert f"(from {profile})" in result.stderr
    assert "did you mean 'topics'?" in result.stderr


def test_environment_variable_overrides_profile_key_in_profile_show():
    result = run_inferno("profile", "show", "enterprise", "--sources",
                         env={"INFERNO_LOGGING__LEVEL": "debug"})
    assert result.returncode == 0, result.stderr
    assert 'logging.level = "debug"  # environment variable INFERNO_LOGGING__LEVEL' \
        in result.stdout


def test_profile_show_masks_secrets(tmp_path):
    profile = edge_profile(tmp_path, "secret", '')
    result = run_inferno("profile", "show", str(profile),
                         env={"INFERNO_KERNEL__API_TOKEN": "tok-123"})
    assert result.returncode == 1  # api_token is no kernel key...
    assert "kernel.api_token: unknown key" in result.stderr
    assert "tok-123" not in result.stderr + result.stdout  # ...and its value is never echoed


def test_global_options_work_before_and_after_the_subcommand():
    before = run_inferno("--set", "kernel.drain_timeout=7", "profile", "show")
    after = run_inferno("profile", "show", "--set", "kernel.drain_timeout=7")
    for result in (before, after):
        assert result.returncode == 0, result.stderr
        assert "drain_timeout = 7" in result.stdout


def test_plugins_add_subcommands_through_the_hook(installed, tmp_path):
    installed("inferno-hello", {"inferno.plugins": {"hello": "fixture_hello"}},
              {"fixture_hello": COMMANDS})
    result = run_inferno("--profile", "enterprise", "hello", "--help")
    assert result.returncode == 0, result.stderr
    assert "Say which profile is in force." in result.stdout
    result = run_inferno("--profile", "enterprise", "--set", "kernel.drain_timeout=3", "hello")
    assert result.stdout.strip() == "hello from enterprise, drain=3"
    assert "hello" in run_inferno("--help").stdout
    after = run_inferno("hello", "--profile", "enterprise", "--set", "kernel.drain_timeout=4")
    assert after.stdout.strip() == "hello from enterprise, drain=4", after.stderr


def test_a_broken_profile_explains_why_plugin_commands_are_missing(installed):
    installed("inferno-hello", {"inferno.plugins": {"hello": "fixture_hello2"}},
              {"fixture_hello2": COMMANDS})
    result = run_inferno("--set", "kernel.drain_timeout=soon", "hello")
    assert result.returncode == 1
    assert "plugins' commands are unavailable" in result.stderr
    assert "kernel.drain_timeout" in result.stderr


@pytest.mark.parametrize("command", [[], ["serve"], ["plugins"], ["plugins", "list"],
                                     ["plugins", "info"], ["profile"], ["profile", "list"],
                                     ["profile", "show"], ["profile", "validate"]])
def test_every_command_has_help(command):
    result = run_inferno(*command, "--help")
    assert result.returncode == 0, result.stderr
    assert "Usage: inferno" in result.stdout


def test_version():
    result = run_inferno("--version")
    assert result.returncode == 0
    assert result.stdout.startswith("inferno, version ")


def test_module_entry_point(tmp_path: Path):
    result = subprocess.run([str(INFERNO.with_name("python")), "-m", "inferno.kernel",
                             "profile", "list"], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert "edge" in result.stdout


HANGING = """
import asyncio
from inferno.kernel import Backend, Protocol

class Engine(Backend):
    async def start(self):
        (self.context.data_dir / "engine").write_text("started")

    async def stop(self):
        (self.context.data_dir / "engine").write_text("stopped")

    async def load(self, spec):
        raise NotImplementedError

class Stuck(Protocol):
    async def start(self):
        self.log.info("binding forever")
        await asyncio.Event().wait()

    async def stop(self):
        pass
"""


def test_sigterm_while_a_plugin_is_still_starting_stops_what_started(installed, tmp_path):
    installed("inferno-stuck", {"inferno.backends": {"engine": "fixture_stuck:Engine"},
                                "inferno.protocols": {"stuck": "fixture_stuck:Stuck"}},
              {"fixture_stuck": HANGING})
    profile = edge_profile(tmp_path, "stuck", '[backends.engine]\n[protocols.stuck]\n')
    server = Server("--profile", str(profile))
    code, took = server.signal_after("binding forever", signal.SIGTERM)
    assert code == 0
    assert took < 5
    assert (tmp_path / "data" / "backends" / "engine" / "engine").read_text() == "stopped"


def test_an_unusable_data_directory_is_a_clear_error(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    result = run_inferno("--set", f"kernel.data_dir='{blocker}/data'")
    assert result.returncode == 1
    assert f"kernel.data_dir: cannot create {blocker}/data" in result.stderr
    assert "(from --set kernel.data_dir)" in result.stderr


SECRET_EXPORTER = """
from inferno.kernel import ConfigSpec, Exporter, hookimpl

class Vault(Exporter):
    @staticmethod
    @hookimpl
    def inferno_config_spec():
        return ConfigSpec(defaults={"api_key": "", "region": "eu", "signing": ""},
                          secrets=frozenset({"signing"}))
"""


def test_profile_show_masks_secrets_through_the_real_command(installed, tmp_path):
    installed("inferno-vault", {"inferno.exporters": {"vault": "fixture_vault:Vault"}},
              {"fixture_vault": SECRET_EXPORTER})
    profile = edge_profile(tmp_path, "vault", '[exporters.vault]\napi_key = "sk-live-abc"\n')
    env = {"INFERNO_EXPORTERS__VAULT__SIGNING": "sign-me-123"}
    for extra in ([], ["--sources"]):
        result = run_inferno("profile", "show", str(profile), *extra, env=env)
        assert result.returncode == 0, result.stderr
        assert "sk-live-abc" not in result.stdout + result.stderr
        assert "sign-me-123" not in result.stdout + result.stderr
        assert result.stdout.count("********") == 2
        assert '"eu"' in result.stdout


def test_traced_hooks_are_logged_from_the_command_line_too():
    result = run_inferno("profile", "validate", "enterprise", env={"INFERNO_TRACE_HOOKS": "1"})
    assert result.returncode == 0, result.stderr
    hooks = {json.loads(line)["hook"] for line in result.stderr.splitlines()
             if '"hook call"' in line}
    assert {"inferno_add_hookspecs", "inferno_config_spec"} <= hooks


#: A fixed audit key for the enterprise profile, which does not start without one.
AUDIT_KEY = "YWJjZGVmZ2hpamtsbW5vcHFyc3R1dnd4eXowMTIzNDU="


def test_enterprise_logs_are_json_from_the_first_line(installed):
    installed("inferno-flaky", {"inferno.plugins": {"flaky": "fixture_flaky"}},
              {"fixture_flaky": "raise RuntimeError('flaky on import')\n"})
    server = Server("--profile", "enterprise", env={"INFERNO_AUDIT__KEY": AUDIT_KEY})
    code, _ = server.signal_after('"event": "ready"')
    assert code == 0
    lines = [line for line in server.rest().splitlines() if line.strip()]
    assert any("skipping plugin that failed to load" in line for line in lines)
    for line in lines:
        json.loads(line)  # every line, the early warning included, is a JSON object


def test_global_options_are_accepted_on_every_group_and_command():
    for command in (["profile", "list", "--profile", "enterprise"],
                    ["plugins", "--profile", "enterprise", "list"],
                    ["profile", "--set", "kernel.drain_timeout=2", "show"]):
        result = run_inferno(*command)
        assert result.returncode == 0, (command, result.stderr)
    assert "drain_timeout = 2" in run_inferno("profile", "--set", "kernel.drain_timeout=2",
                                              "show").stdout
    wrong = run_inferno("plugins", "info", "log", "--profile", "nosuch")
    assert wrong.returncode == 1
    assert "no profile named 'nosuch'" in wrong.stderr


def test_plugins_list_shows_every_claimant_of_a_conflicting_name(installed):
    module = "from inferno.kernel import Exporter\nclass Twin(Exporter):\n    pass\n"
    installed("inferno-one", {"inferno.exporters": {"twin": "fixture_t1:Twin"}},
              {"fixture_t1": module})
    installed("inferno-two", {"inferno.exporters": {"twin": "fixture_t2:Twin"}},
              {"fixture_t2": module})
    result = run_inferno("plugins", "list", "--json")
    twins = [row for row in json.loads(result.stdout) if row["name"] == "twin"]
    assert sorted(row["distribution"] for row in twins) == ["inferno-one", "inferno-two"]
    assert all(row["conflict"] for row in twins)
    assert "claimed by inferno-" in result.stderr


def test_a_plugin_returning_something_that_is_not_a_command_is_ignored(installed):
    installed("inferno-odd", {"inferno.plugins": {"odd": "fixture_odd"}},
              {"fixture_odd": "def inferno_cli_commands():\n    return ['not a command']\n"})
    result = run_inferno("--help")
    assert result.returncode == 0
    assert "not a click command; ignored" in result.stderr
