"""``inferno events``, run through click against a kernel built by ``make_kernel``."""

from __future__ import annotations

from click.testing import CliRunner, Result
from inferno.kernel import Kernel
from inferno.kernel.cli import CliState

from inferno_eventfile import EventFileExporter
from inferno_eventfile.commands import events, inferno_cli_commands

PLUGINS = {"eventfile": EventFileExporter}


def invoke(kernel: Kernel, *args: str) -> Result:
    """Run the command with a kernel the test built, instead of one from a profile."""
    return CliRunner().invoke(events, list(args), obj=CliState.for_kernel(kernel))


async def nothing(kernel: Kernel) -> None:
    """A scenario that only starts and stops the kernel."""


def test_the_hook_adds_the_events_command():
    assert [command.name for command in inferno_cli_commands()] == ["events"]


def test_events_prints_the_last_lines_of_the_file(make_kernel, run_kernel, inferno_data_dir):
    kernel = make_kernel({"exporters": {"eventfile": {}}}, plugins=PLUGINS)
    run_kernel(kernel, nothing)
    written = (inferno_data_dir / "exporters" / "eventfile" / "events.jsonl").read_text()

    result = invoke(kernel, "-n", "2")

    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == written.splitlines()[-2:]


def test_events_reads_the_path_the_profile_configures(make_kernel, run_kernel, tmp_path):
    target = tmp_path / "custom.jsonl"
    kernel = make_kernel({"exporters": {"eventfile": {"path": str(target)}}}, plugins=PLUGINS)
    run_kernel(kernel, nothing)

    result = invoke(kernel, "--lines", "1")

    assert result.stdout.splitlines() == target.read_text().splitlines()[-1:]


def test_events_fails_when_the_profile_does_not_enable_the_exporter(make_kernel):
    result = invoke(make_kernel({}))

    assert result.exit_code == 1
    assert "the eventfile exporter is not enabled in this profile" in result.stderr
    assert "[exporters.eventfile]" in result.stderr


def test_events_fails_when_the_exporter_is_disabled(make_kernel):
    kernel = make_kernel({"exporters": {"eventfile": {"enabled": False}}}, plugins=PLUGINS)

    result = invoke(kernel)

    assert result.exit_code == 1
    assert "not enabled" in result.stderr


def test_events_fails_when_nothing_was_written_yet(make_kernel):
    kernel = make_kernel({"exporters": {"eventfile": {}}}, plugins=PLUGINS)

    result = invoke(kernel)

    assert result.exit_code == 1
    assert "no event file yet" in result.stderr
