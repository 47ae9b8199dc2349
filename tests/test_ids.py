"""Task ids: unique, in time order, and never repeated by a forked child."""

from __future__ import annotations

import os
import re
import time

import pytest

from zq.ids import new_id

pytestmark = pytest.mark.timeout(20)


def test_ids_are_32_hex_characters_and_unique():
    ids = [new_id() for _ in range(20_000)]  # several refills of the buffer
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)
    assert len(set(ids)) == len(ids)


def test_later_ids_sort_after_earlier_ones():
    first = new_id()
    start = time.monotonic()
    while time.monotonic() - start < 0.002:  # past the next millisecond
        pass
    later = [new_id() for _ in range(1000)]
    assert all(first < i for i in later)
    assert int(first[:12], 16) <= time.time_ns() // 1_000_000  # the time, in ms


def test_a_forked_child_does_not_repeat_its_parents_ids():
    new_id()  # the buffer is filled and partly used before the fork
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next ids, to the parent, then out at once
        try:
            os.write(write, "".join(new_id() for _ in range(50)).encode())
        finally:
            os._exit(0)
    try:
        os.close(write)
        data = b""
        while chunk := os.read(read, 65536):
            data += chunk
    finally:
        os.close(read)
        os.waitpid(pid, 0)
    child = {data[i : i + 32].decode() for i in range(0, len(data), 32)}
    parent = {new_id() for _ in range(50)}
    assert len(child) == 50
    assert not child & parent, "the child drew the ids its parent draws next"
