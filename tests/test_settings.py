"""Each broker and worker option is declared once, in its settings dataclass: the
``zq`` command's defaults and help come from there. No sockets, no processes."""

from __future__ import annotations

import dataclasses

import click
import pytest

from zq import cli
from zq.broker import BrokerSettings
from zq.procpool import Limits
from zq.settings import described, setting
from zq.worker import WorkerSettings

#: The environment variables the two commands read (unset here: defaults only).
ENV = ("ZQ_BIND", "ZQ_PUB", "ZQ_JOURNAL", "ZQ_CURVE_SECRET", "ZQ_AUTHORIZED_KEYS", "ZQ_BROKER")


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    for name in ENV:
        monkeypatch.delenv(name, raising=False)


def _parsed(command: str) -> dict:
    """What the command's options hold when none is given."""
    with cli.main.commands[command].make_context(command, []) as ctx:
        return dict(ctx.params)


@pytest.mark.parametrize("settings", [BrokerSettings, WorkerSettings, Limits])
def test_every_setting_has_its_help_and_stays_keyword_only_and_frozen(settings):
    for field in dataclasses.fields(settings):
        assert described(settings, field.name).help.endswith("."), field.name
        assert field.kw_only, field.name
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings().__setattr__(dataclasses.fields(settings)[0].name, None)


def test_the_broker_command_defaults_are_the_dataclass_defaults():
    given = _parsed("broker")
    names = {f.name for f in dataclasses.fields(BrokerSettings)}
    assert set(given) <= names
    assert BrokerSettings(**given) == BrokerSettings()


def test_the_worker_command_defaults_are_the_dataclass_defaults():
    given = _parsed("worker")
    defaults, limits = WorkerSettings(), Limits()
    assert given["broker"] == defaults.broker
    assert given["concurrency"] == defaults.concurrency  # the CPU count, from one place
    assert given["pool"] == defaults.pool
    assert tuple(given["queues"].split(",")) == defaults.queues
    assert given["shutdown_timeout"] == defaults.shutdown_timeout
    for name in ("soft_time_limit", "time_limit", "max_tasks_per_child", "max_memory_per_child"):
        assert given[name] == getattr(limits, name), name


@pytest.mark.parametrize("command, settings", [("broker", BrokerSettings), ("worker", Limits)])
def test_an_options_help_is_its_fields_help(command, settings):
    """The field's text, then what the option adds: its variable, a default that is
    not a plain value."""
    names = {f.name for f in dataclasses.fields(settings)}
    options = [o for o in cli.main.commands[command].params if o.name in names]
    assert options
    for option in options:
        if option.name == "max_memory_per_child":
            continue  # in MiB on the command line: its own text
        field = described(settings, option.name)
        assert isinstance(option, click.Option) and option.help.startswith(field.help)


def test_declared_says_the_variable_and_a_default_that_is_not_a_value():
    bind = cli._declared(BrokerSettings, "bind", env="ZQ_BIND")
    assert bind["default"] == "tcp://127.0.0.1:5555" and bind["show_default"]
    assert bind["help"].endswith("random loopback port. [env ZQ_BIND]")
    pub = cli._declared(BrokerSettings, "pub_bind", env="ZQ_PUB")
    assert pub["default"] is None and not pub["show_default"]
    assert pub["help"].endswith(
        "[env ZQ_PUB; default: the --bind port + 1; peers learn it from the broker]"
    )
    limit = cli._declared(Limits, "time_limit")
    assert limit["help"].endswith("sets its own. [default: none]") and limit["envvar"] is None


def test_a_setting_made_by_a_factory_reports_the_factory():
    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Example:
        size: int = setting(default_factory=lambda: 3, help="How many.", shown="three")
        name: str = setting("x", help="Its name.")

    size = described(Example, "size")
    assert size.default() == 3 and size.shown == "three" and Example().size == 3
    assert described(Example, "name") == ("x", "Its name.", None)
    with pytest.raises(KeyError):
        described(Example, "other")
