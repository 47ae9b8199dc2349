"""ZQ/1: the wire protocol, as named constants and the only frame builder and parser.

Every message is a ZeroMQ multipart message::

    [tag] [command] [header] [payload ...]

* ``tag`` says protocol version and role: :data:`CLIENT`, :data:`WORKER`, :data:`BROKER`.
* ``command`` is one byte, one of the constants below.
* ``header`` is a small msgpack map; it is all the broker ever decodes.
* ``payload`` frames (task arguments, results) are opaque to the broker and are
  forwarded as received.

On the broker's XPUB, messages are ``[topic] [command] [header] [payload ...]``.
``docs/protocol.md`` is the prose version of this module.
"""

from __future__ import annotations

import datetime as _dt
import decimal
import threading
import uuid
from typing import Any

import msgpack

from zq.errors import ProtocolError

#: Role tags. The trailing letter names the sender's role.
CLIENT = b"ZQ1C"
WORKER = b"ZQ1W"
BROKER = b"ZQ1B"
TAGS = (CLIENT, WORKER, BROKER)

# Client -> broker
HELLO = b"\x01"
SUBMIT = b"\x02"
FETCH = b"\x03"
STATUS = b"\x05"
DEAD_LETTERS = b"\x06"  # list or requeue dead letters; the reply has the same command
REVOKE = b"\x07"  # client: revoke tasks (reply: REVOKE); broker -> worker: stop a run
PERIODIC = b"\x08"  # list periodic schedules, or remove some; the reply has the same command
# Broker -> client
WELCOME = b"\x11"
ACCEPTED = b"\x12"
REJECTED = b"\x13"
RESULT = b"\x14"
RESULTS = b"\x15"  # on the XPUB: a loop turn's results for one client, as one message
# Worker -> broker
READY = b"\x21"
STARTED = b"\x22"
PROGRESS = b"\x23"
DONE = b"\x24"
# Broker -> worker
TASK = b"\x31"
# Any direction
HEARTBEAT = b"\x40"
DISCONNECT = b"\x41"
EVENT = b"\x42"  # on the XPUB only: a monitoring event
ERROR = b"\x7f"

COMMAND_NAMES = {
    HELLO: "HELLO",
    SUBMIT: "SUBMIT",
    FETCH: "FETCH",
    STATUS: "STATUS",
    DEAD_LETTERS: "DEAD_LETTERS",
    REVOKE: "REVOKE",
    PERIODIC: "PERIODIC",
    WELCOME: "WELCOME",
    ACCEPTED: "ACCEPTED",
    REJECTED: "REJECTED",
    RESULT: "RESULT",
    RESULTS: "RESULTS",
    READY: "READY",
    STARTED: "STARTED",
    PROGRESS: "PROGRESS",
    DONE: "DONE",
    TASK: "TASK",
    HEARTBEAT: "HEARTBEAT",
    DISCONNECT: "DISCONNECT",
    EVENT: "EVENT",
    ERROR: "ERROR",
}

# Task states, as they appear in headers and in AsyncResult.status.
PENDING = "PENDING"  # unknown to the broker (not yet accepted, or never submitted)
QUEUED = "QUEUED"  # accepted and waiting for a worker
STARTED_STATE = "STARTED"  # a worker is running it
SUCCESS = "SUCCESS"
FAILURE = "FAILURE"
REJECTED_STATE = "REJECTED"
DEAD = "DEAD"  # given up on: the worker running it died too many times (a dead letter)
LOST = "LOST"  # in a worker's DONE only: the process running the task died
RETRY = "RETRY"  # the task asked to run again; the broker holds it for its countdown
EXPIRED = "EXPIRED"  # not started before its ``expires`` time
REVOKED = "REVOKED"  # revoked before it ran, or stopped while running (terminate)
FINAL_STATES = frozenset({SUCCESS, FAILURE, REJECTED_STATE, DEAD, EXPIRED, REVOKED})
#: What a REVOKE reply says of each id (the reply lists the ids under these keys).
REVOKE_OUTCOMES = ("revoked", "terminating", "running", "finished", "unknown")

#: Events published on the XPUB under topics that start with this byte; results go
#: under ``client_id + task_id``, and client ids are hex, so they never collide.
EVENT_PREFIX = b"@"

#: Headers larger than this are refused before decoding. Batches (SUBMIT, TASK, DONE)
#: and READY's list of running tasks are kept under it by their senders.
MAX_HEADER_BYTES = 1024 * 1024
#: Room a sender leaves under MAX_HEADER_BYTES for the fields around a batch's items.
HEADER_SLACK = 4096
#: Most slots one worker may have (its READY lists the tasks it holds).
MAX_CONCURRENCY = 4096
#: The broker's default limit on one message (``zq broker --max-message-size``); peers
#: assume it until the broker's WELCOME says otherwise.
DEFAULT_MAX_MESSAGE = 4 * 1024 * 1024
#: What clients and workers accept in one message from the broker (MAXMSGSIZE on their
#: sockets): a generous cap, since they learn the broker's own limit only after connecting.
PEER_MAX_MESSAGE = 256 * 1024 * 1024
#: Room to leave in a message for the frames and header around a payload.
ENVELOPE = 64 * 1024

_EXT_DATETIME = 1
_EXT_DATE = 2
_EXT_UUID = 3
_EXT_DECIMAL = 4


def pack_header(header: dict[str, Any]) -> bytes:
    """Encode a header map."""
    return msgpack.packb(header, use_bin_type=True)


def unpack_header(data: bytes | memoryview) -> dict[str, Any]:
    """Decode a header map, raising :class:`ProtocolError` for anything else."""
    if len(data) > MAX_HEADER_BYTES:
        raise ProtocolError(f"header of {len(data)} bytes exceeds {MAX_HEADER_BYTES}")
    try:
        header = msgpack.unpackb(data, raw=False, strict_map_key=True, use_list=True)
    except Exception as exc:  # msgpack raises several unrelated types
        raise ProtocolError(f"undecodable header: {exc}", [bytes(data)]) from None
    if not isinstance(header, dict):
        raise ProtocolError("header is not a map", [bytes(data)])
    return header


def pack_list(key: str, packed: list[bytes], **fields: Any) -> bytes:
    """The header ``{key: [...], **fields}`` from items packed already (no decode, no
    re-pack of the items); at most 14 ``fields``."""
    head = bytes([0x80 | (1 + len(fields))])  # a fixmap
    for name, value in fields.items():
        head += msgpack.packb(name) + msgpack.packb(value, use_bin_type=True)
    return head + msgpack.packb(key) + _array_head(len(packed)) + b"".join(packed)


def _array_head(n: int) -> bytes:
    if n < 16:
        return bytes([0x90 | n])
    if n < 65536:
        return b"\xdc" + n.to_bytes(2, "big")
    return b"\xdd" + n.to_bytes(4, "big")


def message(tag: bytes, command: bytes, header: dict[str, Any], *payload: Any) -> list[Any]:
    """Build the frames of one message (without any routing identity)."""
    return [tag, command, pack_header(header), *payload]


def parse(frames: list[Any]) -> tuple[bytes, bytes, dict[str, Any], list[Any]]:
    """Split ``[tag, command, header, payload...]`` into its parts.

    Frames may be ``bytes`` or ``zmq.Frame``; payload frames are returned as they came.
    Raises :class:`ProtocolError` with the reason when the message is not ZQ/1.
    """
    if len(frames) < 3:
        raise ProtocolError(f"expected at least 3 frames, got {len(frames)}")
    tag, command = _bytes(frames[0]), _bytes(frames[1])
    if tag not in TAGS:
        raise ProtocolError(f"unknown tag {tag[:16]!r}")
    if command not in COMMAND_NAMES:
        raise ProtocolError(f"unknown command {command[:8]!r}")
    return tag, command, unpack_header(_buffer(frames[2])), frames[3:]


def _bytes(frame: Any) -> bytes:
    return frame if isinstance(frame, bytes) else frame.bytes


def _buffer(frame: Any) -> bytes | memoryview:
    return frame if isinstance(frame, bytes) else frame.buffer


# ---------------------------------------------------------------- payload codec


#: Types a map key may have: msgpack carries them and they come back as an equal,
#: hashable key. A tuple key would come back a list, which no dict can hold.
_KEY_TYPES = (str, int, float, bytes, _dt.date, uuid.UUID, decimal.Decimal, type(None))
_KEY_NAMES = "str, int, float, bool, None, bytes, datetime, date, UUID or Decimal"
_VALUE_NAMES = (
    "str, int, float, bool, None, bytes, list, tuple, dict, set, datetime, date, UUID, Decimal"
)
#: How deep msgpack's packer nests containers (deeper, it refuses the value).
_MAX_DEPTH = 1024
#: msgpack's integers: from a signed to an unsigned 64-bit number.
_INT_RANGE = range(-(2**63), 2**64)


def _default(obj: Any) -> Any:
    """What msgpack packs for a value it does not pack itself. It is run with
    ``strict_types``, so tuples and subclasses of the built-in types come here too."""
    if isinstance(obj, (tuple, list)):
        return list(obj)
    if isinstance(obj, dict):
        return dict(obj)
    if isinstance(obj, _dt.datetime):
        return msgpack.ExtType(_EXT_DATETIME, obj.isoformat().encode())
    if isinstance(obj, _dt.date):
        return msgpack.ExtType(_EXT_DATE, obj.isoformat().encode())
    if isinstance(obj, uuid.UUID):
        return msgpack.ExtType(_EXT_UUID, obj.bytes)
    if isinstance(obj, decimal.Decimal):
        return msgpack.ExtType(_EXT_DECIMAL, str(obj).encode())
    if isinstance(obj, (set, frozenset)):
        return sorted(obj, key=repr)
    # Subclasses (enums, say) travel as their plain value, whatever their __str__ says.
    if isinstance(obj, str):
        return str.__str__(obj)
    if isinstance(obj, int):
        return int.__int__(obj)
    if isinstance(obj, float):
        return float.__float__(obj)
    if isinstance(obj, bytes):
        return bytes(obj)
    raise TypeError(
        f"{type(obj).__qualname__} values cannot be sent ({_short(obj)}); zq sends {_VALUE_NAMES}"
    )


def _ext_hook(code: int, data: bytes) -> Any:
    if code == _EXT_DATETIME:
        return _dt.datetime.fromisoformat(data.decode())
    if code == _EXT_DATE:
        return _dt.date.fromisoformat(data.decode())
    if code == _EXT_UUID:
        return uuid.UUID(bytes=data)
    if code == _EXT_DECIMAL:
        return decimal.Decimal(data.decode())
    return msgpack.ExtType(code, data)


def encode(value: Any) -> bytes:
    """Encode task arguments or a result; :class:`TypeError`, saying where, for what
    could not make the round trip (a type msgpack cannot carry, a tuple as a dict key).

    Beyond msgpack's own types, ``datetime``, ``date``, ``UUID`` and ``Decimal``
    round-trip as extension types; sets become sorted lists and tuples become lists.
    """
    try:
        return _pack(value)
    except _Refused as refused:
        raise TypeError(_cannot(_problem(value, "value"), refused.cause)) from None


def encode_call(args: Any, kwargs: Any) -> bytes:
    """Encode a task call's ``[args, kwargs]``; a :class:`TypeError` names the argument
    (``args[0]['totals'][(1, 2)]``, ``kwargs['when']``)."""
    if not isinstance(kwargs, dict):
        raise TypeError(f"zq cannot encode kwargs: a dict is needed, got {type(kwargs).__name__}")
    for name in kwargs:
        if not isinstance(name, str):  # the worker would fail to call fn(**kwargs)
            raise TypeError(
                f"zq cannot encode kwargs[{_short(name)}]: keyword argument names must be "
                f"str (got {type(name).__qualname__})"
            )
    args = list(args)
    try:
        return _pack([args, kwargs])
    except _Refused as refused:
        found = _problem(args, "args") or _problem(kwargs, "kwargs")
        raise TypeError(_cannot(found, refused.cause)) from None


class _Refused(Exception):
    """Raised by :func:`_pack`; the caller finds where and says so."""

    def __init__(self, cause: Exception) -> None:
        super().__init__(str(cause))
        self.cause = cause


class _ManyTuples(Exception):
    """Stops a packing that met many tuples: see :meth:`_Packing.default`."""


#: Tuples after which a value is packed again by msgpack alone (tuples natively).
_MANY_TUPLES = 32
#: Output size past which a thread drops its Packer, whose buffer keeps its peak size.
_KEEP_BUFFER = 256 * 1024


class _Packing:
    """A thread's msgpack Packer, and what its current packing has met.

    A Packer made per call (as ``msgpack.packb`` does) cost as much as packing a small
    value. It packs with ``strict_types``, so every tuple and every subclass of a
    built-in type goes through :meth:`default`: a hashable container there (a tuple, a
    frozenset) may be a map key, which would decode as a list or a map, which cannot
    be one. Such values are decoded once as the receiver will, to be sure; values
    without one, the common case, are not.
    """

    __slots__ = ("busy", "packer", "suspect", "tuples")

    def __init__(self) -> None:
        self.busy = False
        self.suspect = False
        self.tuples = 0
        self.packer = self._new()

    def _new(self) -> msgpack.Packer:
        return msgpack.Packer(
            default=self.default, use_bin_type=True, datetime=False, strict_types=True
        )

    def default(self, obj: Any) -> Any:
        if type(obj) is tuple:
            self.tuples += 1
            if self.tuples > _MANY_TUPLES:  # a Python call each: let msgpack do them
                raise _ManyTuples
            self.suspect = True
            return list(obj)
        out = _default(obj)
        if type(out) in (list, dict) and type(obj).__hash__ is not None:
            self.suspect = True
        return out

    def pack(self, value: Any) -> bytes:
        if self.busy:  # re-entered (a finalizer, a signal handler): the Packer is in use
            return _pack_checked(value)
        self.busy, self.suspect, self.tuples = True, False, 0
        try:
            data = self.packer.pack(value)
        except _ManyTuples:
            data = _pack_checked(value)
            self.suspect = False
        finally:
            self.busy = False
        if self.suspect:
            msgpack.unpackb(data, strict_map_key=False)  # TypeError: unhashable type
        if len(data) > _KEEP_BUFFER:
            self.packer = self._new()
        return data


def _pack_checked(value: Any) -> bytes:
    """Pack with msgpack alone (tuples natively, in C), then decode once to check."""
    data = msgpack.packb(value, default=_default, use_bin_type=True, datetime=False)
    msgpack.unpackb(data, strict_map_key=False)
    return data


_threads = threading.local()  # .packing: each thread's own _Packing


def _pack(value: Any) -> bytes:
    """msgpack bytes that decode to ``value`` (tuples as lists), else :class:`_Refused`."""
    try:
        packing = _threads.packing
    except AttributeError:
        packing = _threads.packing = _Packing()
    try:
        return packing.pack(value)
    except (TypeError, ValueError, OverflowError) as exc:
        raise _Refused(exc) from None


def _cannot(found: tuple[str, str] | None, exc: Exception) -> str:
    if found is None:
        return f"zq cannot encode this value: {exc}"
    where, why = found
    if len(where) > 160:
        where = where[:150] + "..."
    return f"zq cannot encode {where}: {why}"


def _problem(value: Any, name: str) -> tuple[str, str] | None:
    """The first part of ``value`` (called ``name``) that cannot make the round trip:
    its path and why. Run only when encoding failed, so it may take its time; a loop,
    not recursion, because msgpack nests deeper than Python recurses."""
    stack: list[tuple[Any, str, int]] = [(value, name, 0)]
    while stack:
        obj, path, depth = stack.pop()
        if isinstance(obj, (dict, list, tuple, set, frozenset)):
            if depth >= _MAX_DEPTH:
                return path, f"nested more than {_MAX_DEPTH} deep (does it contain itself?)"
            if isinstance(obj, dict):
                children = []
                for key, item in obj.items():
                    where = f"{path}[{_short(key)}]"
                    if not isinstance(key, _KEY_TYPES):
                        return where, _bad_key(key)
                    found = _leaf_problem(key, where)
                    if found is not None:
                        return found
                    children.append((item, where, depth + 1))
            elif isinstance(obj, (list, tuple)):
                children = [(item, f"{path}[{i}]", depth + 1) for i, item in enumerate(obj)]
            else:
                children = [(item, f"a member of {path}", depth + 1) for item in obj]
            stack.extend(reversed(children))
        else:
            found = _leaf_problem(obj, path)
            if found is not None:
                return found
    return None


def _bad_key(key: Any) -> str:
    why = f"map keys must be {_KEY_NAMES} (got {type(key).__qualname__}"
    if isinstance(key, (tuple, frozenset)):
        why += ", which would arrive as a list, and a list cannot be a key"
    return why + ")"


def _leaf_problem(obj: Any, path: str) -> tuple[str, str] | None:
    """Why ``obj``, not a container, cannot be encoded; None if it can."""
    if isinstance(obj, int) and not isinstance(obj, bool):
        if obj in _INT_RANGE:
            return None
        return path, f"integers must be within -2**63 .. 2**64-1 (got {_short(obj)})"
    try:
        msgpack.packb(obj, default=_default, use_bin_type=True, datetime=False, strict_types=True)
    except (TypeError, ValueError, OverflowError) as exc:
        return path, str(exc)
    return None


def _short(obj: Any) -> str:
    """A repr fit for an error message, whatever the object."""
    if isinstance(obj, int) and obj.bit_length() > 64:
        return f"an int of {obj.bit_length()} bits"  # (repr of a huge int may raise)
    try:
        text = repr(obj)
    except Exception:
        text = f"<{type(obj).__qualname__} object>"
    return text if len(text) <= 60 else text[:57] + "..."


def decode(data: bytes | memoryview) -> Any:
    """Decode what :func:`encode` made."""
    return msgpack.unpackb(data, raw=False, ext_hook=_ext_hook, strict_map_key=False)


def failure(type_name: str, message: str, tb: str = "") -> bytes:
    """The payload of a task that did not succeed: what ``zq.TaskFailed`` carries."""
    return encode({"type": type_name, "message": message, "traceback": tb})


# ---------------------------------------------------------------- validation

#: Heartbeat periods a broker may set (``zq broker --heartbeat``) and its peers accept
#: from a WELCOME: much shorter, and a worker would spend its time renewing its lease.
MIN_HEARTBEAT = 0.05
MAX_HEARTBEAT = 3600.0
#: The smallest message size limit a broker may set (``--max-message-size``): peers
#: leave ENVELOPE of each message to the frames and header around a payload.
MIN_MAX_MESSAGE = 2 * ENVELOPE


def welcome_settings(
    header: dict[str, Any], heartbeat: float, liveness: int, max_message: int
) -> tuple[float, int, int]:
    """The heartbeat, liveness and message size limit a WELCOME sets (the values given
    here for what it leaves out); :class:`ProtocolError` if one is implausible."""
    heartbeat = header.get("heartbeat", heartbeat)
    liveness = header.get("liveness", liveness)
    max_message = header.get("max_message_size", max_message)
    problem = settings_problem(heartbeat, liveness, max_message)
    if problem is not None:
        raise ProtocolError(f"implausible WELCOME: {problem}")
    return float(heartbeat), liveness, max_message


def settings_problem(heartbeat: Any, liveness: Any, max_message: Any) -> str | None:
    """What is wrong with a broker's heartbeat, liveness or message size limit, for
    its workers and clients; None if nothing."""
    if type(heartbeat) not in (int, float) or not MIN_HEARTBEAT <= heartbeat <= MAX_HEARTBEAT:
        bounds = f"{MIN_HEARTBEAT:g} to {MAX_HEARTBEAT:g} seconds"
        return f"heartbeat must be {bounds}, got {heartbeat!r}"
    if type(liveness) is not int or liveness < 3:
        # A cut-off worker stops its keyed tasks 1.5 heartbeats (and its children's
        # check) after it sent the last message the broker answered; 3 keeps 1.35 or
        # more between that and its keys going elsewhere (2 would keep 0.35: a GC pause).
        return f"liveness must be >= 3 (keyed tasks' fencing), got {liveness!r}"
    if type(max_message) is not int or not MIN_MAX_MESSAGE <= max_message <= PEER_MAX_MESSAGE:
        return (
            f"max_message_size must be {MIN_MAX_MESSAGE} to {PEER_MAX_MESSAGE} bytes, "
            f"got {max_message!r}"
        )
    return None


#: Longest a task may ask to wait before it runs again (a RETRY's ``countdown``, and
#: a task's retry delays), in seconds: the broker holds the task, and its key, meanwhile.
MAX_RETRY_COUNTDOWN = 7 * 24 * 3600.0

#: Limits on submit header fields, checked by the broker.
MAX_ID_LEN = 64
MAX_NAME_LEN = 200
MAX_QUEUE_LEN = 100
MAX_KEY_LEN = 256
MIN_PRIORITY, MAX_PRIORITY = 0, 9
#: ``eta`` and ``expires`` are Unix times (seconds) before this (the year 2286).
MAX_TIMESTAMP = 1e10

_TEXT_FIELDS = (
    ("id", MAX_ID_LEN, True),
    ("name", MAX_NAME_LEN, True),
    ("queue", MAX_QUEUE_LEN, True),
    ("key", MAX_KEY_LEN, False),
)


def check_task_header(header: Any) -> str | None:
    """Return why a submitted task header is invalid, or None when it is fine."""
    if not isinstance(header, dict):
        return "task header is not a map"
    for field, limit, required in _TEXT_FIELDS:
        value = header.get(field)
        if value is None:
            if required:
                return f"{field}: missing"
            continue
        if not isinstance(value, str):
            return f"{field}: must be a string, got {type(value).__name__}"
        if not value or len(value) > limit:
            return f"{field}: length must be 1..{limit}, got {len(value)}"
    if not isinstance(header.get("ignore_result", False), bool):
        return "ignore_result: must be a boolean"
    priority = header.get("priority", 0)
    if type(priority) is not int or not MIN_PRIORITY <= priority <= MAX_PRIORITY:
        return f"priority: must be an integer {MIN_PRIORITY}..{MAX_PRIORITY}, got {priority!r:.20}"
    for field in ("eta", "expires"):
        value = header.get(field)
        if value is not None and (
            type(value) not in (int, float) or not 0 <= value < MAX_TIMESTAMP
        ):
            return f"{field}: must be a Unix time in seconds, got {value!r:.40}"
    return None
