"""Settings fields that carry their own help: each option written once.

An option of the broker or of a worker is a field of a frozen settings dataclass
(:class:`zq.broker.BrokerSettings`, :class:`zq.worker.WorkerSettings`,
:class:`zq.procpool.Limits`), declared with :func:`setting`: its default, what
``--help`` says of it, and, when the default is not a plain value, how to say it
("CPU count", "never"). The ``zq`` command's options read all three from the field
(:func:`described`), so a default changed in the dataclass is changed on the command
line and in its help with it. Nothing here imports the rest of zq.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple


def setting(
    default: Any = dataclasses.MISSING,
    *,
    help: str,
    shown: str | None = None,
    default_factory: Callable[[], Any] | Any = dataclasses.MISSING,
) -> Any:
    """A dataclass field with its ``help`` text; ``shown`` is what the help says of
    the default when the value itself would not say it (None, a factory)."""
    metadata = {"help": help, "shown": shown}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


class Described(NamedTuple):
    """One setting as ``--help`` presents it."""

    #: The value, or the factory that makes it (click calls a callable default when
    #: the option is not given; ``shown`` says what it makes).
    default: Any
    help: str
    shown: str | None


def described(settings: type, name: str) -> Described:
    """The default and help of the field ``name`` of the dataclass ``settings``;
    KeyError if it has no such field, or one declared without :func:`setting`."""
    field = {f.name: f for f in dataclasses.fields(settings)}[name]
    default = field.default
    if default is dataclasses.MISSING:
        default = field.default_factory
    return Described(default, field.metadata["help"], field.metadata["shown"])
