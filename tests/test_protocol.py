"""Unit tests for ``zq.protocol``: the payload codec, header framing and validation.

No sockets: everything here is pure functions on bytes.
"""

from __future__ import annotations

import datetime as dt
import decimal
import uuid

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import zq
from zq import protocol as p

# ---------------------------------------------------------------- codec


@pytest.mark.parametrize(
    "value",
    [
        0,
        1,
        -1,
        2**63 - 1,
        -(2**63),
        2**64 - 1,
        0.0,
        -2.5,
        1e300,
        float("inf"),
        "",
        "héllo ✓",
        b"",
        b"\x00\xff raw",
        None,
        True,
        False,
        [],
        {},
        [1, "two", 3.0, None, [True, {"k": b"v"}]],
        {"a": {"b": {"c": [1, 2, {"d": None}]}}, "e": []},
        {1: "int keys survive too"},
    ],
    ids=repr,
)
def test_msgpack_values_round_trip(value):
    out = p.decode(p.encode(value))
    assert out == value
    assert type(out) is type(value)


@pytest.mark.parametrize(
    "value",
    [
        dt.datetime(2024, 2, 29, 13, 45, 7, 123456),
        dt.datetime(1999, 12, 31, 23, 59, 59),
        dt.datetime(2024, 6, 1, 12, 0, tzinfo=dt.timezone.utc),
        dt.datetime(
            2024, 6, 1, 12, 0, 0, 5, tzinfo=dt.timezone(dt.timedelta(hours=-5, minutes=-30))
        ),
        dt.date(2024, 2, 29),
        dt.date(1, 1, 1),
        uuid.UUID("12345678-1234-5678-1234-567812345678"),
        uuid.uuid4(),
        decimal.Decimal("0"),
        decimal.Decimal("-12.3400"),
        decimal.Decimal("1E+30"),
        decimal.Decimal("3.14159265358979323846264338327950288419716939937510"),
    ],
    ids=repr,
)
def test_extension_types_round_trip(value):
    out = p.decode(p.encode(value))
    assert out == value
    assert type(out) is type(value)
    if isinstance(value, dt.datetime):
        assert out.utcoffset() == value.utcoffset()  # naive stays naive, aware keeps offset
    if isinstance(value, decimal.Decimal):
        assert str(out) == str(value)  # exponent and trailing zeros kept


def test_extension_types_nested_in_containers():
    value = {
        "when": dt.datetime(2024, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc),
        "day": dt.date(2024, 1, 2),
        "ids": [uuid.UUID(int=1), uuid.UUID(int=2)],
        "amounts": {"net": decimal.Decimal("9.99"), "tax": decimal.Decimal("0.01")},
    }
    assert p.decode(p.encode(value)) == value


def test_date_is_not_confused_with_datetime():
    assert type(p.decode(p.encode(dt.date(2024, 5, 6)))) is dt.date
    assert type(p.decode(p.encode(dt.datetime(2024, 5, 6)))) is dt.datetime


def test_tuples_become_lists():
    assert p.decode(p.encode((1, (2, 3)))) == [1, [2, 3]]


def test_sets_encode_as_lists():
    assert p.decode(p.encode({3, 1, 2})) == [1, 2, 3]
    assert p.decode(p.encode(frozenset({"b", "a"}))) == ["a", "b"]
    assert p.decode(p.encode(set())) == []
    # Mixed types are ordered deterministically, whatever the set's iteration order.
    mixed = p.decode(p.encode({1, "a", 2.5}))
    assert isinstance(mixed, list)
    assert sorted(mixed, key=repr) == mixed
    assert set(mixed) == {1, "a", 2.5}


def test_encode_unsupported_type_raises_type_error_naming_it():
    class Gadget:
        pass

    with pytest.raises(TypeError, match="object"):
        p.encode(object())
    with pytest.raises(TypeError, match="Gadget"):
        p.encode({"nested": [Gadget()]})


def test_encode_out_of_range_int_raises_type_error():
    with pytest.raises(TypeError, match="cannot encode"):
        p.encode(2**64)


def test_decode_keeps_unknown_extension_types():
    assert p.decode(msgpack.packb(msgpack.ExtType(42, b"xyz"))) == msgpack.ExtType(42, b"xyz")


_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False)
    | st.text()
    | st.binary()
)
_values = st.recursive(
    _scalars,
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(), children, max_size=5)
    ),
    max_leaves=30,
)


@settings(max_examples=200, deadline=None, database=None)
@given(_values)
def test_decode_inverts_encode_for_msgpack_values(value):
    assert p.decode(p.encode(value)) == value


# ---------------------------------------------------------------- headers


def test_pack_unpack_header_round_trip():
    header = {"client": "c1", "tasks": [{"id": "t", "name": "n", "queue": "q"}], "wait": 1.5}
    assert p.unpack_header(p.pack_header(header)) == header


def test_unpack_header_accepts_a_memoryview():
    assert p.unpack_header(memoryview(p.pack_header({"a": 1}))) == {"a": 1}


@pytest.mark.parametrize(
    "data",
    [
        b"\xc1",
        b"\x81",
        b"\x82\xa1a\x01",
        b"\xdd\xff\xff\xff\xff",
        b"garbage \xff\xfe",
        b"\x91" * 5000,
    ],
    ids=repr,
)
def test_unpack_header_rejects_garbage(data):
    with pytest.raises(zq.ProtocolError) as info:
        p.unpack_header(data)
    assert info.value.reason


def test_unpack_header_rejects_empty_bytes():
    with pytest.raises(zq.ProtocolError):
        p.unpack_header(b"")


@pytest.mark.parametrize("value", [[1, 2], "text", 7, None, b"bytes"], ids=repr)
def test_unpack_header_rejects_non_map(value):
    data = msgpack.packb(value)
    with pytest.raises(zq.ProtocolError, match="not a map") as info:
        p.unpack_header(data)
    assert info.value.frames == [data]  # the raw bytes are kept for the log


def test_unpack_header_rejects_non_string_map_keys():
    with pytest.raises(zq.ProtocolError):
        p.unpack_header(msgpack.packb({1: "x"}))


def test_unpack_header_rejects_oversize_before_decoding():
    big = p.pack_header({"blob": b"x" * p.MAX_HEADER_BYTES})
    assert len(big) > p.MAX_HEADER_BYTES
    with pytest.raises(zq.ProtocolError, match="exceeds"):
        p.unpack_header(big)
    # Oversize garbage is refused by its size alone.
    with pytest.raises(zq.ProtocolError, match="exceeds"):
        p.unpack_header(b"\xc1" * (p.MAX_HEADER_BYTES + 1))


def test_unpack_header_accepts_exactly_max_size():
    sizes = {
        len(p.pack_header({"blob": b"x" * n})): n
        for n in range(p.MAX_HEADER_BYTES - 16, p.MAX_HEADER_BYTES)
    }
    header = {"blob": b"x" * sizes[p.MAX_HEADER_BYTES]}
    assert p.unpack_header(p.pack_header(header)) == header


def test_message_builds_frames():
    frames = p.message(p.CLIENT, p.HELLO, {"client": "c"}, b"payload")
    assert frames[:2] == [p.CLIENT, p.HELLO]
    assert p.unpack_header(frames[2]) == {"client": "c"}
    assert frames[3:] == [b"payload"]


# ---------------------------------------------------------------- parse


def test_parse_splits_a_valid_message():
    tag, command, header, payload = p.parse(p.message(p.WORKER, p.DONE, {"id": "x"}, b"a", b"b"))
    assert (tag, command, header, payload) == (p.WORKER, p.DONE, {"id": "x"}, [b"a", b"b"])


@pytest.mark.parametrize("frames", [[], [p.CLIENT], [p.CLIENT, p.HELLO]], ids=len)
def test_parse_rejects_fewer_than_three_frames(frames):
    with pytest.raises(zq.ProtocolError, match="at least 3 frames"):
        p.parse(frames)


@pytest.mark.parametrize("tag", [b"XXXX", b"", b"ZQ1", b"ZQ2C", b"zq1c", b"ZQ1C\x00"], ids=repr)
def test_parse_rejects_unknown_tag(tag):
    with pytest.raises(zq.ProtocolError, match="unknown tag"):
        p.parse([tag, p.HELLO, p.pack_header({})])


@pytest.mark.parametrize("command", [b"\x00", b"\x99", b"", b"\x01\x01", b"HELLO"], ids=repr)
def test_parse_rejects_unknown_command(command):
    with pytest.raises(zq.ProtocolError, match="unknown command"):
        p.parse([p.CLIENT, command, p.pack_header({})])


def test_parse_rejects_a_bad_header():
    with pytest.raises(zq.ProtocolError, match="undecodable"):
        p.parse([p.CLIENT, p.HELLO, b"\xc1"])
    with pytest.raises(zq.ProtocolError, match="not a map"):
        p.parse([p.CLIENT, p.HELLO, msgpack.packb([1])])


def test_every_command_has_a_name_and_one_byte():
    assert len(p.COMMAND_NAMES) == len(set(p.COMMAND_NAMES.values()))
    assert all(len(c) == 1 for c in p.COMMAND_NAMES)
    assert len(set(p.TAGS)) == 3


# ---------------------------------------------------------------- check_task_header


def _task(**changes):
    header = {"id": "t-1", "name": "tests.tasks.add", "queue": "default"}
    header.update(changes)
    return {k: v for k, v in header.items() if v is not _DROP}


_DROP = object()


def test_check_task_header_accepts_valid_headers():
    assert p.check_task_header(_task()) is None
    assert p.check_task_header(_task(key="customer-42", ignore_result=True)) is None
    assert p.check_task_header(_task(key="k" * p.MAX_KEY_LEN, ignore_result=False)) is None
    assert p.check_task_header(_task(id="i" * p.MAX_ID_LEN, extra={"ignored": 1})) is None


@pytest.mark.parametrize(
    ("header", "field"),
    [
        (_task(id=_DROP), "id"),
        (_task(id=None), "id"),
        (_task(id=""), "id"),
        (_task(id="i" * (p.MAX_ID_LEN + 1)), "id"),
        (_task(id=7), "id"),
        (_task(name=_DROP), "name"),
        (_task(name=123), "name"),
        (_task(name=b"bytes"), "name"),
        (_task(name="n" * (p.MAX_NAME_LEN + 1)), "name"),
        (_task(queue=""), "queue"),
        (_task(queue=_DROP), "queue"),
        (_task(queue=["default"]), "queue"),
        (_task(queue="q" * (p.MAX_QUEUE_LEN + 1)), "queue"),
        (_task(key="k" * (p.MAX_KEY_LEN + 1)), "key"),
        (_task(key=""), "key"),
        (_task(key=42), "key"),
        (_task(ignore_result=1), "ignore_result"),
        (_task(ignore_result="yes"), "ignore_result"),
        (_task(ignore_result=None), "ignore_result"),
    ],
    ids=lambda v: repr(v)[:60] if not isinstance(v, str) else v,
)
def test_check_task_header_names_the_bad_field(header, field):
    reason = p.check_task_header(header)
    assert isinstance(reason, str)
    assert reason.startswith(f"{field}:"), reason


@pytest.mark.parametrize("header", [None, [], "id", 5, b"\x80"], ids=repr)
def test_check_task_header_rejects_non_maps(header):
    assert p.check_task_header(header) == "task header is not a map"
