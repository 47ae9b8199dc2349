"""Arguments and results that cannot make the round trip fail where they are made.

A dict with a tuple key used to pass ``delay()`` (msgpack packs the tuple as an array)
and fail on the worker with ``unhashable type: 'list'`` when it decoded the arguments.
Now encoding refuses it, naming the path to the offending part.
"""

from __future__ import annotations

import collections
import concurrent.futures
import datetime as dt
import decimal
import enum
import re
import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import zq
from tests import payload_tasks
from zq import protocol as p


class Gadget:
    pass


Pair = collections.namedtuple("Pair", "a b")
KEY_RULE = "map keys must be str, int, float, bool, None, bytes, datetime, date, UUID or Decimal"


@pytest.fixture
def offline_app():
    """An app whose broker is never reached: these calls must fail before sending."""
    app = zq.App("payloads", broker="tcp://127.0.0.1:9")

    @app.task
    def take(*args, **kwargs):
        return None

    yield take
    assert app._client is None, "a refused call must not even start a client"


@pytest.mark.parametrize(
    ("args", "kwargs", "where", "why"),
    [
        ([{"totals": {(1, 2): 3}}], {}, "args[0]['totals'][(1, 2)]", KEY_RULE + " (got tuple"),
        ([1, [{"x": {Pair(1, 2): 0}}]], {}, "args[1][0]['x'][Pair(a=1, b=2)]", "(got Pair"),
        ([{frozenset({1}): "f"}], {}, "args[0][frozenset({1})]", "(got frozenset"),
        ([], {"when": {(2024, 1): "jan"}}, "kwargs['when'][(2024, 1)]", "(got tuple"),
        ([{Gadget(): 1}], {}, "args[0][<", "(got Gadget)"),
        ([{"deep": [[Gadget()]]}], {}, "args[0]['deep'][0][0]", "Gadget values cannot be sent"),
        ([{"tags": {1, Gadget()}}], {}, "a member of args[0]['tags']", "Gadget values"),
        ([0, 2**64], {}, "args[1]", "integers must be within"),
        ([{2**70: "big"}], {}, "args[0][an int of 71 bits]", "integers must be within"),
        (["ok", "\ud800"], {}, "args[1]", "surrogates not allowed"),
        ([], {1: "x"}, "kwargs[1]", "keyword argument names must be str"),
    ],
)
def test_delay_refuses_what_cannot_round_trip_naming_where(offline_app, args, kwargs, where, why):
    with pytest.raises(TypeError) as raised:
        offline_app.apply_async(args, kwargs)
    message = str(raised.value)
    assert message.startswith(f"zq cannot encode {where}"), message
    assert why in message


def test_the_message_a_user_sees(offline_app):
    with pytest.raises(TypeError) as raised:
        offline_app.delay({"totals": {(1, 2): 3}})
    assert str(raised.value) == (
        f"zq cannot encode args[0]['totals'][(1, 2)]: {KEY_RULE} (got tuple, which would "
        "arrive as a list, and a list cannot be a key)"
    )


def test_periodic_arguments_are_checked_when_declared(offline_app):
    with pytest.raises(TypeError, match=re.escape("args[0][(1, 2)]")):
        offline_app.app.periodic(every=60, args=[{(1, 2): 3}])


def test_a_value_that_contains_itself_is_refused_not_recursed_into():
    loop: list = []
    loop.append(loop)
    with pytest.raises(TypeError, match=r"zq cannot encode value\[0\]\[0\].*nested more than"):
        p.encode(loop)


class Colour(enum.Enum):
    RED = "red"


class Level(enum.IntEnum):
    HIGH = 9


class Tag(str, enum.Enum):
    URGENT = "urgent"


def test_what_can_round_trip_still_does():
    value = {
        1.5: "float key",
        None: "None key",
        True: "bool key",
        b"raw": "bytes key",
        dt.date(2024, 1, 2): "date key",
        dt.datetime(2024, 1, 2, 3, 4): "datetime key",
        uuid.UUID(int=7): "UUID key",
        decimal.Decimal("1.10"): "Decimal key",
        "tuples": (1, (2, 3)),
        "set of tuples": {(1, 2)},
        "nested": [{"a": ({"b": (1,)},)}],
    }
    assert p.decode(p.encode(value)) == {
        **value,
        "tuples": [1, [2, 3]],
        "set of tuples": [[1, 2]],
        "nested": [{"a": [{"b": [1]}]}],
    }


def test_subclasses_of_builtin_types_travel_as_their_plain_values():
    value = [
        Level.HIGH,
        Tag.URGENT,
        collections.OrderedDict(b=1, a=2),
        collections.defaultdict(list, k=[1]),
        Pair(1, 2),
        {Tag.URGENT: Level.HIGH},
    ]
    out = p.decode(p.encode(value))
    assert out == [9, "urgent", {"b": 1, "a": 2}, {"k": [1]}, [1, 2], {"urgent": 9}]
    assert [type(v) for v in out[:2]] == [int, str]
    with pytest.raises(TypeError, match="Colour values cannot be sent"):
        p.encode(Colour.RED)


def test_a_bad_key_after_many_tuples_is_still_found():
    """Past 32 tuples the value is packed again by msgpack alone, and still checked."""
    rows = [(i, "row") for i in range(100)]
    assert p.decode(p.encode({"rows": rows})) == {"rows": [[i, "row"] for i in range(100)]}
    with pytest.raises(TypeError, match=re.escape("zq cannot encode value['by'][(1, 2)]")):
        p.encode({"rows": rows, "by": {(1, 2): 3}})


class Loud(str):
    """A str whose repr (called while its set is sorted) encodes something itself."""

    said: list[bytes] = []

    def __repr__(self) -> str:
        Loud.said.append(p.encode(["inner", (1, 2)]))
        return str.__repr__(self)


def test_encode_called_while_encoding_gets_a_packer_of_its_own():
    value = [{Loud("b"), Loud("a")}, ("after", {"k": 1})]
    assert p.decode(p.encode(value)) == [["a", "b"], ["after", {"k": 1}]]
    assert Loud.said and all(p.decode(inner) == ["inner", [1, 2]] for inner in Loud.said)


def test_threads_encoding_at_once_each_get_their_own_bytes():
    def work(n: int) -> bool:
        for i in range(2000):
            value = [n, i, (n, "t"), {"n": n, "items": [i] * (i % 7)}]
            if p.decode(p.encode(value)) != [n, i, [n, "t"], {"n": n, "items": [i] * (i % 7)}]:
                return False
        return True

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        assert all(pool.map(work, range(8)))


# Structures whose dict keys may be tuples or frozensets (the cases that used to
# pass encode and break decode) among keys that are fine.
_leaves = st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.text(max_size=5)
_bad_keys = st.tuples(st.integers(0, 3)) | st.frozensets(st.integers(0, 3), max_size=2)
_keys = st.text(max_size=5) | st.integers(-5, 5) | st.floats(allow_nan=False) | _bad_keys
_values = st.recursive(
    _leaves,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.tuples(inner, inner)
        | st.dictionaries(_keys, inner, max_size=4)
    ),
    max_leaves=20,
)


def _has_container_key(value) -> bool:
    if isinstance(value, dict):
        return any(isinstance(k, (tuple, frozenset)) for k in value) or any(
            _has_container_key(v) for v in value.values()
        )
    if isinstance(value, (list, tuple)):
        return any(_has_container_key(v) for v in value)
    return False


def _as_received(value):
    if isinstance(value, dict):
        return {k: _as_received(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_as_received(v) for v in value]
    return value


@settings(max_examples=300, deadline=None, database=None)
@given(_values)
def test_encode_refuses_exactly_what_decode_would_choke_on(value):
    if _has_container_key(value):
        with pytest.raises(TypeError, match=r"^zq cannot encode value.*map keys must be"):
            p.encode(value)
    else:
        assert p.decode(p.encode(value)) == _as_received(value)


# ---------------------------------------------------------------- end to end


@pytest.fixture
def payload_app(broker, start_worker):
    payload_tasks.app.broker = broker.endpoint
    start_worker("tests.payload_tasks", pool="thread", concurrency=1)
    yield payload_tasks.app
    payload_tasks.app.close()


def test_a_result_that_cannot_round_trip_fails_the_task_with_the_path(payload_app):
    res = payload_tasks.totals_by_pair.delay()
    with pytest.raises(zq.TaskFailed) as raised:
        res.get(timeout=20)
    assert raised.value.exc_type == "TypeError"
    assert raised.value.exc_message.startswith(
        "the task's return value: zq cannot encode value['totals'][(1, 2)]: map keys must be"
    )
    # The caller's refusal happens before sending; the worker serves on.
    with pytest.raises(TypeError, match=re.escape("args[0][(1, 2)]")):
        payload_tasks.echo.delay({(1, 2): 3})
    assert payload_tasks.echo.delay({"1,2": (3, 4)}).get(timeout=20) == {"1,2": [3, 4]}
