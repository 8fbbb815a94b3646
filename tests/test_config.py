"""Configuration: layers in order, environment and --set overrides, every error at once."""

from __future__ import annotations

import re
from pathlib import Path
from types import MappingProxyType
from typing import ClassVar

import pytest
from dynaconf import Validator

from inferno.kernel import ConfigError, ConfigSpec, Exporter, Kernel, ProfileNotFound, hookimpl
from inferno.kernel.config import Layers, load_settings, masked, parse_set, profile_chain


class Greeter(Exporter):
    """A driver with settings of every type, for layering tests."""

    @staticmethod
    @hookimpl
    def inferno_config_spec() -> ConfigSpec:
        return ConfigSpec(
            defaults={"port": 1, "greeting": "plugin default", "ratio": 0.5, "tags": [],
                      "api_key": "", "tls": {"min_version": "1.2"}},
            validators=[Validator("port", is_type_of=int, gte=1, lte=65535),
                        Validator("tls.min_version", is_in=["1.2", "1.3"])],
        )


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_each_layer_overrides_the_one_below(tmp_path, monkeypatch):
    parent = write(tmp_path / "parent.toml", 'extends = "edge"\n[exporters.greeter]\n'
                   'greeting = "parent"\nratio = 0.7\nport = 10\n')
    child = write(tmp_path / "child.toml", 'extends = "parent.toml"\n'
                  '[exporters.greeter]\ngreeting = "child"\nport = 20\n')
    user = write(tmp_path / "user.toml", "[exporters.greeter]\nport = 30\n")
    monkeypatch.setenv("INFERNO_EXPORTERS__GREETER__PORT", "40")
    kernel = Kernel.from_profile(str(child), config_file=user,
                                 sets=["exporters.greeter.tags=['a', 'b']"],
                                 plugins={"greeter": Greeter}).configure()
    cfg = kernel.config["exporters"]["greeter"]
    assert cfg["port"] == 40  # env beats the user file, which beats the profiles
    assert cfg["greeting"] == "child"  # the profile beats the profile it extends
    assert cfg["ratio"] == 0.7  # kept from the parent
    assert cfg["tls"]["min_version"] == "1.2"  # the plugin's own default
    assert cfg["tags"] == ("a", "b")  # --set, parsed as TOML
    assert kernel.config["logging"]["format"] == "console"  # from edge, over base
    sources = kernel.assembly.settings
    assert sources.source("exporters.greeter.port") == \
        "environment variable INFERNO_EXPORTERS__GREETER__PORT"
    assert sources.source("exporters.greeter.greeting") == str(child)
    assert sources.source("exporters.greeter.ratio") == str(parent)
    assert sources.source("exporters.greeter.tls.min_version") == "defaults of plugin greeter"
    assert sources.source("exporters.greeter.tags") == "--set exporters.greeter.tags"


def test_set_beats_environment(monkeypatch):
    monkeypatch.setenv("INFERNO_KERNEL__DRAIN_TIMEOUT", "3")
    kernel = Kernel.from_profile("edge", sets=["kernel.drain_timeout=4"]).configure()
    assert kernel.config["kernel"]["drain_timeout"] == 4


def test_environment_variable_overrides_a_profile_key(monkeypatch):
    monkeypatch.setenv("INFERNO_LOGGING__FORMAT", "json")
    assert Kernel.from_profile("edge").configure().config["logging"]["format"] == "json"


def test_every_problem_is_reported_at_once_with_key_and_source(tmp_path, monkeypatch):
    profile = write(tmp_path / "bad.toml", 'extends = "edge"\n[kernel]\ndrain_timeout = "soon"\n'
                    '[logging]\nlevle = "info"\n[exporters.greeter]\nport = 70000\n')
    monkeypatch.setenv("INFERNO_EXPORTERS__GREETER__TLS__MIN_VERSION", "1.0")
    with pytest.raises(ConfigError) as caught:
        Kernel.from_profile(str(profile), plugins={"greeter": Greeter}).configure()
    problems = {p.key: p for p in caught.value.problems}
    assert set(problems) == {"kernel.drain_timeout", "logging.levle", "exporters.greeter.port",
                             "exporters.greeter.tls.min_version"}
    assert problems["logging.levle"].message == "unknown key; did you mean 'level'?"
    assert problems["exporters.greeter.port"].source == str(profile)
    assert "at most 65535" in problems["exporters.greeter.port"].message
    assert problems["exporters.greeter.tls.min_version"].source == \
        "environment variable INFERNO_EXPORTERS__GREETER__TLS__MIN_VERSION"
    assert "4 problems" in str(caught.value)


def test_types_are_inferred_from_defaults(make_kernel):
    with pytest.raises(ConfigError) as caught:
        make_kernel({"exporters": {"greeter": {"greeting": 5, "tags": "x", "ratio": 1}}},
                    plugins={"greeter": Greeter})
    messages = {p.key: p.message for p in caught.value.problems}
    assert messages == {"exporters.greeter.greeting": "must be a string, got integer 5",
                        "exporters.greeter.tags": "must be a list, got string 'x'"}


def test_unknown_section_is_reported_with_a_suggestion(make_kernel):
    with pytest.raises(ConfigError, match="protocol: unknown section; did you mean 'protocols'"):
        make_kernel({"protocol": {"http": {}}})


def test_driver_that_is_not_installed_names_what_is(make_kernel):
    with pytest.raises(ConfigError) as caught:
        make_kernel({"exporters": {"lgo": {}}})
    (problem,) = caught.value.problems
    assert problem.key == "exporters.lgo"
    assert "no plugin named 'lgo'" in problem.message
    assert "installed exporters: log" in problem.message


def test_a_driver_can_be_turned_off_by_a_higher_layer(make_kernel):
    kernel = make_kernel({"exporters": {"greeter": {}}}, plugins={"greeter": Greeter},
                         sets=["exporters.greeter.enabled=false"])
    assert "greeter" not in kernel.assembly.drivers.get("exporters", {})


def test_plugins_receive_only_their_own_frozen_section(make_kernel, run_kernel):
    kernel = make_kernel({"exporters": {"greeter": {"port": 8}}}, plugins={"greeter": Greeter})

    async def scenario(k):
        return k.drivers("exporters")["greeter"].config

    section = run_kernel(kernel, scenario)
    assert isinstance(section, MappingProxyType)
    assert set(section) == {"port", "greeting", "ratio", "tags", "api_key", "tls"}
    with pytest.raises(TypeError):
        section["port"] = 9  # type: ignore[index]


def test_secrets_are_masked_when_shown(make_kernel):
    kernel = make_kernel({"exporters": {"greeter": {"api_key": "sk-live-123"}}},
                         plugins={"greeter": Greeter})
    shown = kernel.masked_config()
    assert shown["exporters"]["greeter"]["api_key"] == "********"
    assert "sk-live-123" not in repr(shown)
    assert kernel.config["exporters"]["greeter"]["api_key"] == "********"


def test_a_driver_sees_its_own_secrets_and_no_one_elses(make_kernel, run_kernel):
    class Other(Exporter):
        pass

    kernel = make_kernel({"exporters": {"greeter": {"api_key": "sk-live-123"}, "other": {}}},
                         plugins={"greeter": Greeter, "other": Other})

    async def scenario(k):
        drivers = k.drivers("exporters")
        own = drivers["greeter"].config["api_key"]
        seen_by_other = drivers["other"].context.kernel.config["exporters"]["greeter"]["api_key"]
        return own, seen_by_other

    assert run_kernel(kernel, scenario) == ("sk-live-123", "********")


def test_masking_by_name_and_by_declaration():
    tree = {"a": {"password": "p", "token": "t", "tokens_per_minute": 5, "note": "n",
                  "private": "x"}}
    shown = masked(tree, frozenset({"a.private"}))
    assert shown == {"a": {"password": "********", "token": "********", "tokens_per_minute": 5,
                           "note": "n", "private": "********"}}


def test_profiles_extending_in_a_cycle_are_rejected(tmp_path):
    write(tmp_path / "a.toml", 'extends = "b.toml"\n')
    write(tmp_path / "b.toml", 'extends = "a.toml"\n')
    with pytest.raises(ConfigError, match=re.escape("cycle: a.toml -> b.toml -> a.toml")):
        profile_chain(str(tmp_path / "a.toml"))


def test_unknown_profile_names_the_shipped_ones():
    message = "no profile named 'edgy'; shipped profiles: base, edge, enterprise"
    with pytest.raises(ProfileNotFound, match=re.escape(message)):
        profile_chain("edgy")


def test_malformed_set_is_a_clear_error():
    with pytest.raises(ConfigError, match=re.escape("expected --set section.key=value")):
        parse_set("port9000")


def test_invalid_toml_names_the_file(tmp_path):
    bad = write(tmp_path / "broken.toml", "[kernel\n")
    with pytest.raises(ConfigError, match="invalid TOML") as caught:
        profile_chain(str(bad))
    assert caught.value.problems[0].source == str(bad)


def test_no_config_file_is_discovered_from_the_working_directory(tmp_path, monkeypatch):
    for name in ("settings.toml", "inferno.toml", ".secrets.toml", "config.toml"):
        write(tmp_path / name, '[kernel]\ndrain_timeout = 99\n[logging]\nformat = "json"\n')
    write(tmp_path / ".env", "INFERNO_LOGGING__FORMAT=json\n")
    monkeypatch.chdir(tmp_path)
    settings = load_settings(Layers(files=profile_chain("edge")), defaults={})
    assert settings.data["kernel"]["drain_timeout"] == 10.0
    assert settings.data["logging"]["format"] == "console"
    assert settings.files == profile_chain("edge")


def test_a_higher_layer_replaces_a_list_instead_of_appending(tmp_path, monkeypatch):
    profile = write(tmp_path / "p.toml", 'extends = "edge"\n[plugins]\nblock = ["a", "b"]\n'
                    '[exporters.log]\ntopics = ["kernel.state"]\n')
    user = write(tmp_path / "u.toml", '[plugins]\nblock = ["c"]\n')
    monkeypatch.setenv("INFERNO_EXPORTERS__LOG__TOPICS", '["plugin.started"]')
    kernel = Kernel.from_profile(str(profile), config_file=user).configure()
    assert kernel.config["plugins"]["block"] == ("c",)
    assert kernel.config["exporters"]["log"]["topics"] == ("plugin.started",)
    emptied = Kernel.from_profile(str(profile), sets=["plugins.block=[]"]).configure()
    assert emptied.config["plugins"]["block"] == ()


def test_environment_beats_a_profile_given_as_a_dict(make_kernel, monkeypatch):
    monkeypatch.setenv("INFERNO_KERNEL__STOP_TIMEOUT", "2.5")
    kernel = make_kernel({"kernel": {"stop_timeout": 9.0, "drain_timeout": 1.0}})
    assert kernel.config["kernel"]["stop_timeout"] == 2.5
    assert kernel.config["kernel"]["drain_timeout"] == 1.0


def test_secret_values_never_appear_in_validation_errors(make_kernel):
    with pytest.raises(ConfigError) as caught:
        make_kernel({"exporters": {"greeter": {"api_key": 424242}}}, plugins={"greeter": Greeter})
    (problem,) = caught.value.problems
    assert problem.key == "exporters.greeter.api_key"
    assert "424242" not in str(caught.value)
    assert "********" in problem.message


def test_a_user_file_may_not_extend_a_profile(tmp_path):
    user = write(tmp_path / "user.toml", 'extends = "enterprise"\n')
    with pytest.raises(ConfigError, match="only a profile may extend another"):
        Kernel.from_profile("edge", config_file=user)


def test_an_unknown_section_names_the_file_it_came_from(tmp_path):
    profile = write(tmp_path / "p.toml", 'extends = "edge"\n[servers.web]\nport = 1\n')
    with pytest.raises(ConfigError) as caught:
        Kernel.from_profile(str(profile)).configure()
    assert caught.value.problems[0].source == str(profile)


def test_files_beside_the_named_ones_and_dynaconf_variables_are_not_read(tmp_path, monkeypatch):
    folder = tmp_path / "loc"
    folder.mkdir()
    profile = write(folder / "my.toml", 'extends = "edge"\n')
    write(folder / "my.local.toml", '[logging]\nformat = "json"\n')
    user = write(tmp_path / "user.toml", "[kernel]\nstop_timeout = 5.0\n")
    write(tmp_path / "user.local.toml", "[kernel]\ndrain_timeout = 99.0\n")
    included = write(tmp_path / "inc.toml", "[kernel]\nevent_queue_size = 7\n")
    monkeypatch.setenv("INCLUDES_FOR_DYNACONF", str(included))
    monkeypatch.setenv("SETTINGS_FILE_FOR_DYNACONF", str(included))
    kernel = Kernel.from_profile(str(profile), config_file=user).configure()
    assert kernel.config["logging"]["format"] == "console"
    assert kernel.config["kernel"]["stop_timeout"] == 5.0
    assert kernel.config["kernel"]["drain_timeout"] == 10.0
    assert kernel.config["kernel"]["event_queue_size"] == 1000


@pytest.mark.parametrize(("text", "expected"), [
    ('extends = 5\n', "extends: must name one profile or profile file, got 5"),
    ('extends = ["edge"]\n', "extends: must name one profile or profile file"),
])
def test_a_malformed_extends_is_a_clear_error(tmp_path, text, expected):
    profile = write(tmp_path / "p.toml", text)
    with pytest.raises(ConfigError, match=re.escape(expected)):
        profile_chain(str(profile))


def test_a_file_that_is_not_utf8_names_the_file(tmp_path):
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"\xff\xfe[kernel]")
    with pytest.raises(ConfigError, match="not UTF-8 text") as caught:
        profile_chain(str(binary))
    assert caught.value.problems[0].source == str(binary)


def test_values_dynaconf_cannot_convert_are_config_problems(monkeypatch):
    monkeypatch.setenv("INFERNO_KERNEL__STOP_TIMEOUT", "@int soon")
    with pytest.raises(ConfigError) as caught:
        Kernel.from_profile("edge", sets=["kernel.drain_timeout=@json {x"]).configure()
    problems = {p.key: p.source for p in caught.value.problems}
    assert problems == {"kernel.stop_timeout": "environment variable INFERNO_KERNEL__STOP_TIMEOUT",
                        "kernel.drain_timeout": "--set kernel.drain_timeout"}


def test_a_secret_given_with_a_malformed_set_is_not_echoed():
    with pytest.raises(ConfigError) as caught:
        parse_set("exporters.greeter.api_key hunter2")
    assert "hunter2" not in str(caught.value)


def test_a_table_from_the_environment_merges_into_the_section(monkeypatch):
    monkeypatch.setenv("INFERNO_LOGGING", '{format = "json"}')
    kernel = Kernel.from_profile("edge").configure()
    assert kernel.config["logging"]["format"] == "json"
    assert kernel.config["logging"]["level"] == "info"
    sources = kernel.assembly.settings
    assert sources.source("logging.format") == "environment variable INFERNO_LOGGING"
    assert sources.source("logging.level").endswith("edge.toml")


def test_replacing_a_whole_section_reports_the_missing_keys(monkeypatch):
    monkeypatch.setenv("INFERNO_LOGGING", "5")
    monkeypatch.setenv("INFERNO_LOGGING__FORMAT", "json")
    with pytest.raises(ConfigError) as caught:
        Kernel.from_profile("edge").configure()
    keys = {p.key for p in caught.value.problems}
    assert keys == {"logging.level", "logging.levels"}
    assert all("[logging] was replaced as a whole" in p.message for p in caught.value.problems)


def test_enabled_must_be_a_boolean(make_kernel):
    with pytest.raises(ConfigError, match=r"exporters\.log\.enabled: must be true or false, "
                                          r"got 'false'"):
        make_kernel({"exporters": {"log": {"enabled": "false"}}})


def test_config_file_that_is_a_directory(tmp_path):
    with pytest.raises(ConfigError, match="is a directory; expected a TOML file"):
        Kernel.from_profile("edge", config_file=tmp_path)


class Vault:
    """A hook plugin that owns the top-level section [vault]."""

    section = "vault"
    seen: ClassVar[dict[str, object]] = {}

    @classmethod
    @hookimpl
    def inferno_config_spec(cls) -> ConfigSpec:
        return ConfigSpec(section=cls.section, defaults={"key": "", "depth": 1},
                          validators=[Validator("depth", gte=1)])

    @classmethod
    @hookimpl
    def inferno_configure(cls, config: dict[str, object]) -> None:
        cls.seen = dict(config)


def test_a_hook_plugin_may_own_a_top_level_section(make_kernel, monkeypatch):
    monkeypatch.setenv("INFERNO_VAULT__KEY", "s3cret-from-env")
    kernel = make_kernel({"vault": {"depth": 3}}, plugins={"vault": Vault})
    assert Vault.seen == {"key": "s3cret-from-env", "depth": 3}  # its own, secrets and all
    assert kernel.config["vault"] == {"key": "********", "depth": 3}  # what others see
    assert kernel.plugin_config("vault")["key"] == "s3cret-from-env"
    assert "vault" not in kernel.config["plugins"]
    with pytest.raises(ConfigError, match=r"vault\.depth: must be at least 1"):
        make_kernel({"vault": {"depth": 0}}, plugins={"vault": Vault})
    with pytest.raises(ConfigError, match=r"vault\.colour: unknown key"):
        make_kernel({"vault": {"colour": "red"}}, plugins={"vault": Vault})


def test_a_hook_plugin_may_not_take_a_kernel_or_driver_section(make_kernel, monkeypatch):
    monkeypatch.setattr(Vault, "section", "logging")
    with pytest.raises(ConfigError, match=r"ConfigSpec\.section 'logging' is not a free"):
        make_kernel(plugins={"vault": Vault})
    monkeypatch.setattr(Vault, "section", "backends")
    with pytest.raises(ConfigError, match=r"ConfigSpec\.section 'backends' is not a free"):
        make_kernel(plugins={"vault": Vault})


def test_a_declared_secret_covers_the_keys_below_it_and_may_use_wildcards():
    from inferno.kernel.config import masked

    tree = {"alerts": {"notifiers": {"ops": {"url": "https://hook/t0k3n", "timeout": 5,
                                             "headers": {"Authorization": "Bearer x1"}}}}}
    shown = masked(tree, frozenset({"alerts.notifiers.*.url", "alerts.notifiers.*.headers"}))
    ops = shown["alerts"]["notifiers"]["ops"]
    assert ops["url"] == "********"
    assert ops["headers"]["Authorization"] == "********"
    assert ops["timeout"] == 5
