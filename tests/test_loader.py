"""Plugin loading: named plugins fail loudly, discovered ones are skipped, conflicts are named."""

from __future__ import annotations

import re

import pytest

from inferno.kernel import ConfigError, Kernel
from inferno.kernel.loader import discover

GOOD_EXPORTER = """
from inferno.kernel import Exporter, ConfigSpec, hookimpl

class Recorder(Exporter):
    @staticmethod
    @hookimpl
    def inferno_config_spec():
        return ConfigSpec(defaults={"label": "x"})
"""


def test_installed_driver_loads_by_its_entry_point_name(installed, make_kernel):
    installed("inferno-recorder", {"inferno.exporters": {"recorder": "fixture_rec:Recorder"}},
              {"fixture_rec": GOOD_EXPORTER})
    kernel = make_kernel({"exporters": {"recorder": {"label": "y"}}})
    assert kernel.assembly.drivers["exporters"]["recorder"].__name__ == "Recorder"
    assert kernel.manager.get_plugin("recorder") is not None
    assert kernel.config["exporters"]["recorder"]["label"] == "y"


def test_named_driver_that_fails_to_import_stops_configuration(installed, make_kernel):
    installed("inferno-broken", {"inferno.exporters": {"broken": "fixture_broken:Thing"}},
              {"fixture_broken": "import does_not_exist_anywhere\n"})
    with pytest.raises(ConfigError) as caught:
        make_kernel({"exporters": {"broken": {}}})
    (problem,) = caught.value.problems
    assert problem.key == "exporters.broken"
    assert "ModuleNotFoundError" in problem.message
    assert "does_not_exist_anywhere" in problem.message


def test_discovered_hook_plugin_that_fails_is_skipped_with_a_warning(installed, make_kernel,
                                                                      capsys):
    installed("inferno-flaky", {"inferno.plugins": {"flaky": "fixture_flaky"}},
              {"fixture_flaky": "raise RuntimeError('flaky on import')\n"})
    kernel = make_kernel()
    assert "flaky" in kernel.assembly.skipped
    assert "RuntimeError: flaky on import" in kernel.assembly.skipped["flaky"]
    assert "flaky" not in kernel.assembly.hook_plugins


def test_hook_plugin_named_in_allow_that_fails_stops_configuration(installed, make_kernel):
    installed("inferno-flaky", {"inferno.plugins": {"flaky": "fixture_flaky2"}},
              {"fixture_flaky2": "raise RuntimeError('flaky on import')\n"})
    message = "plugin 'flaky': cannot import fixture_flaky2"
    with pytest.raises(ConfigError, match=re.escape(message)):
        make_kernel({"plugins": {"allow": ["flaky"]}})


def test_allow_list_loads_only_the_listed_hook_plugins(installed, make_kernel):
    installed("inferno-a", {"inferno.plugins": {"alpha": "fixture_alpha", "beta": "fixture_beta"}},
              {"fixture_alpha": "", "fixture_beta": ""})
    kernel = make_kernel({"plugins": {"allow": ["alpha"]}})
    assert set(kernel.assembly.hook_plugins) == {"alpha"}


def test_blocked_plugins_are_never_loaded(installed, make_kernel):
    installed("inferno-a", {"inferno.plugins": {"alpha": "fixture_alpha3"}},
              {"fixture_alpha3": "raise SystemExit('must not be imported')\n"})
    kernel = make_kernel({"plugins": {"block": ["alpha"]}})
    assert "alpha" not in kernel.assembly.hook_plugins
    assert kernel.manager.is_blocked("alpha")


def test_enabling_a_blocked_driver_is_an_error(make_kernel):
    with pytest.raises(ConfigError, match=r"exporters\.log: is enabled here but blocked"):
        make_kernel({"exporters": {"log": {}}, "plugins": {"block": ["log"]}})


def test_two_distributions_claiming_one_name_is_an_error_naming_both(installed, make_kernel):
    installed("inferno-one", {"inferno.exporters": {"twin": "fixture_one:Recorder"}},
              {"fixture_one": GOOD_EXPORTER})
    installed("inferno-two", {"inferno.exporters": {"twin": "fixture_two:Recorder"}},
              {"fixture_two": GOOD_EXPORTER}, version="2.0")
    assert [c.distribution for c in discover().conflicts[("inferno.exporters", "twin")]] == \
        ["inferno-two", "inferno-one"]
    with pytest.raises(ConfigError) as caught:
        make_kernel({"exporters": {"twin": {}}})
    message = str(caught.value)
    assert "inferno-one 1.0" in message
    assert "inferno-two 2.0" in message


def test_misspelled_hook_implementation_is_an_error(make_kernel):
    class Sloppy:
        @staticmethod
        def inferno_config_spek():  # a typo of inferno_config_spec
            return None

    with pytest.raises(ConfigError, match="inferno_config_spek"):
        make_kernel(plugins={"sloppy": Sloppy})


def test_driver_entry_point_must_implement_its_contract(installed, make_kernel):
    installed("inferno-wrong", {"inferno.backends": {"wrong": "fixture_wrong:Recorder"}},
              {"fixture_wrong": GOOD_EXPORTER})
    message = "backends.wrong: fixture_wrong.Recorder is not a Backend"
    with pytest.raises(ConfigError, match=re.escape(message)):
        make_kernel({"backends": {"wrong": {}}})


def test_kernels_do_not_share_plugin_managers(make_kernel):
    class Hooks:
        @staticmethod
        def inferno_kernel_ready(kernel):
            pass

    first = make_kernel(plugins={"hooks": Hooks})
    second = make_kernel()
    assert first.manager is not second.manager
    assert first.manager.get_plugin("hooks") is Hooks
    assert second.manager.get_plugin("hooks") is None


def test_tracing_logs_every_hook_call_with_timing(monkeypatch, capsys):
    monkeypatch.setenv("INFERNO_TRACE_HOOKS", "1")
    from inferno.kernel.logs import configure_logging
    configure_logging("json", "info")
    Kernel.from_profile("edge").configure()
    err = capsys.readouterr().err
    assert '"hook": "inferno_config_spec"' in err
    assert '"ms": ' in err


def test_a_hook_written_as_an_instance_method_on_a_driver_is_rejected(make_kernel):
    from inferno.kernel import Exporter

    class Careless(Exporter):
        def inferno_config_spec(self):  # needs @staticmethod: the class is what registers
            return None

    with pytest.raises(ConfigError, match="make it a @staticmethod or @classmethod"):
        make_kernel({"exporters": {"careless": {}}}, plugins={"careless": Careless})


def test_a_plugin_hook_spec_that_clashes_is_reported(make_kernel):
    import pluggy

    class Specs:
        @pluggy.HookspecMarker("inferno")
        def inferno_kernel_ready(self, kernel, extra):  # clashes with the kernel's own
            pass

    class Offers:
        @staticmethod
        def inferno_add_hookspecs(plugin_manager):
            plugin_manager.add_hookspecs(Specs)

    with pytest.raises((ConfigError, ValueError)):
        make_kernel(plugins={"offers": Offers})


def test_one_name_in_two_kinds_is_refused_clearly(installed, make_kernel):
    installed("inferno-logtools", {"inferno.plugins": {"log": "fixture_logtools"}},
              {"fixture_logtools": ""})
    with pytest.raises(ConfigError) as caught:
        make_kernel({"exporters": {"log": {}}})
    (problem,) = caught.value.problems
    assert problem.key == "exporters.log"
    assert "the name 'log' is already taken by another plugin" in problem.message
    assert "unique across kinds" in problem.message


def test_a_hook_plugin_the_profile_configures_must_load(installed, make_kernel):
    installed("inferno-ghost", {"inferno.plugins": {"ghost": "fixture_ghost"}},
              {"fixture_ghost": "import no_such_dependency\n"})
    with pytest.raises(ConfigError) as caught:
        make_kernel({"plugins": {"ghost": {"port": 1}}})
    (problem,) = caught.value.problems
    assert problem.key == "plugins.ghost"
    assert "no_such_dependency" in problem.message


def test_async_hook_implementations_are_rejected(make_kernel):
    class Eager:
        @staticmethod
        async def inferno_kernel_ready(kernel):
            pass

    with pytest.raises(ConfigError, match="inferno_kernel_ready is async; hooks are synchronous"):
        make_kernel(plugins={"eager": Eager})


def test_a_config_spec_of_the_wrong_type_is_reported(make_kernel):
    class Sloppy:
        @staticmethod
        def inferno_config_spec():
            return {"port": 1}

    with pytest.raises(ConfigError, match="must return a ConfigSpec or None, got dict"):
        make_kernel(plugins={"sloppy": Sloppy})
