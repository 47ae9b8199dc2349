"""Pure state: the order in which the broker takes each client's SUBMIT messages.

A client numbers its SUBMITs (``n``, counting up) and says in each the number of its
oldest SUBMIT that still holds a task the broker has not acknowledged (``since``).
The broker takes a SUBMIT only if nothing older of that client can still be on its
way: either ``since == n`` (everything sent before it is acknowledged) or it follows
the last SUBMIT this broker took from the client (``n`` is the next number). Otherwise
an older submit was lost (the broker restarted under it, say) and this one would
overtake it, so the broker asks the client to send its unacknowledged submits again,
oldest first; the client keeps them until they are acknowledged, so nothing is lost,
and a task's key order holds (docs/reliability.md).
"""

from __future__ import annotations

from collections import OrderedDict

#: Clients whose next SUBMIT number the broker remembers (the least recently heard are
#: forgotten first: such a client's next SUBMIT may cost it a resend, nothing more).
MAX_CLIENTS = 100_000


class SubmitOrder:
    """The next SUBMIT number the broker expects from each client."""

    __slots__ = ("_next",)

    def __init__(self) -> None:
        self._next: OrderedDict[str, int] = OrderedDict()

    def take(self, client: str, n: int, since: int) -> bool:
        """True if the broker may take SUBMIT ``n`` of ``client`` now (and expects
        ``n + 1`` next); False if an older one of its submits may be missing."""
        expected = self._next.get(client)
        if since != n and n != expected:
            return False
        self._next[client] = n + 1
        self._next.move_to_end(client)
        if len(self._next) > MAX_CLIENTS:
            self._next.popitem(last=False)
        return True
