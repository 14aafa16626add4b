"""Settings: environment, flag overrides, and errors that name the variable."""

from __future__ import annotations

import pytest

from taskloom.core.errors import ConfigError
from taskloom.core.settings import parse_duration
from taskloom.supervisor.settings import SupervisorSettings
from taskloom.worker.settings import WorkerSettings


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("15", 15.0), ("250ms", 0.25), ("1.5s", 1.5), ("5m", 300.0), ("7d", 604800.0)],
)
def test_durations_take_units(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


def test_environment_is_read_and_flags_win(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TASKLOOM_LEASE_TTL", "30s")
    monkeypatch.setenv("TASKLOOM_CAPABILITIES", "llm, search")
    monkeypatch.setenv("OLLAMA_HOST", "gpu-box:11434")
    monkeypatch.setenv("TASKLOOM_REDIS_URL", "redis://env:6379/0")
    settings = SupervisorSettings.load(redis_url="redis://flag:6379/1", listen=None)
    assert settings.lease_ttl == 30.0
    assert settings.capabilities == ("llm", "search")
    assert settings.ollama_host == "gpu-box:11434"
    assert settings.redis_url == "redis://flag:6379/1"
    assert settings.listen == "127.0.0.1:50051"


def test_bad_values_fail_at_start_naming_the_variable_and_the_flag(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TASKLOOM_LEASE_TTL", "soon")
    monkeypatch.setenv("TASKLOOM_MAX_ATTEMPTS", "0")
    with pytest.raises(ConfigError) as caught:
        SupervisorSettings.load(redis_url="http://nope")
    message = str(caught.value)
    assert "TASKLOOM_LEASE_TTL / --lease-ttl: 'soon' is not a duration" in message
    assert "TASKLOOM_MAX_ATTEMPTS: Input should be greater than or equal to 1" in message
    assert "TASKLOOM_REDIS_URL / --redis-url: must start with redis://" in message


def test_a_leader_ttl_past_the_redis_timeout_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    # A write Redis answers after the supervisor gave up on it must find the
    # lease lapsed (tests/test_end_to_end.py freezes Redis past both).
    monkeypatch.setenv("TASKLOOM_LEADER_TTL", "15s")
    with pytest.raises(ConfigError) as caught:
        SupervisorSettings.load()
    assert "TASKLOOM_LEADER_TTL / --leader-ttl: must be under 10s" in str(caught.value)
    monkeypatch.setenv("TASKLOOM_LEADER_TTL", "9s")
    assert SupervisorSettings.load().leader_ttl == 9.0


def test_addresses_and_capabilities_are_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(
        ConfigError, match="TASKLOOM_SUPERVISOR / --supervisor: 'localhost' is not HOST:PORT"
    ):
        WorkerSettings.load(supervisor="localhost")
    with pytest.raises(
        ConfigError, match=r"TASKLOOM_CAPABILITIES / --capabilities: .*at least one"
    ):
        WorkerSettings.load(capabilities=" , ")
    with pytest.raises(ConfigError, match="TASKLOOM_LISTEN"):
        SupervisorSettings.load(listen="0.0.0.0:99999")


def test_every_setting_is_described_and_every_flag_is_made_from_its_setting() -> None:
    import click

    from taskloom.client.cli import cli
    from taskloom.client.settings import ClientSettings
    from taskloom.supervisor.cli import command as supervisor_command
    from taskloom.supervisor.settings import SupervisorSettings
    from taskloom.worker.cli import command as worker_command
    from taskloom.worker.settings import WorkerSettings

    submit = cli.get_command(click.Context(cli), "submit")
    assert submit is not None
    for settings, command in (
        (SupervisorSettings, supervisor_command),
        (WorkerSettings, worker_command),
        (ClientSettings, submit),
    ):
        for name, info in settings.model_fields.items():
            assert info.description, f"{settings.__name__}.{name} has no docstring"
        options = {p.name: p for p in command.params if isinstance(p, click.Option)}
        for name, flag in settings.flag_names.items():
            if command is submit and name not in ("supervisor", "token", "tls_ca"):
                continue
            option = options[name]
            assert flag in option.opts
            assert settings.env_name(name) in (option.help or "")
