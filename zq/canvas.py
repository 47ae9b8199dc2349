"""Signatures and workflows: ``task.s()``, ``chain``, ``group``, ``chord``.

A workflow is sent to the broker whole, as tasks that name the tasks they wait for
(``after``) and whose results they take as their first argument (``args_from``). The
broker holds each step until its parents have finished, so a workflow completes
even if the process that sent it exits at once, and survives a broker restart (the
steps are in its journal). docs/workflows.md has the rules and examples::

    chain(fetch.s(url), parse.s(), store.s()).apply_async()      # or fetch.s(url) | parse.s()
    group(score.s(o) for o in orders).apply_async().get()        # a list of results
    chord((score.s(o) for o in orders), total.s()).apply_async() # total([...results])
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from zq.message import seconds, task_message, timing
from zq.workflow import MAX_PARENTS

if TYPE_CHECKING:
    from zq.app import App, Task
    from zq.client import AsyncResult

#: One task of a workflow, ready to send: the app it is sent through, header, payload.
Step = tuple["App", dict[str, Any], bytes]

#: Options a signature may carry (see Task.apply_async).
OPTIONS = frozenset({"queue", "key", "countdown", "eta", "expires", "priority", "task_id"})


class Canvas:
    """What signatures, chains and groups have in common: they can be sent and chained."""

    def __or__(self, other: Canvas) -> chain:
        return chain(self, other)

    def apply_async(self) -> AsyncResult | GroupResult:
        """Send the workflow; returns the result of its last step (a GroupResult when
        that is a group)."""
        steps: list[Step] = []
        _, values, kind = self._build([], None, None, steps)
        results = {header["id"]: app.submit(header, payload) for app, header, payload in steps}
        if kind == "one":
            return results[values[0]]
        return GroupResult([results[i] for i in values])

    def delay(self) -> AsyncResult | GroupResult:
        """The same as :meth:`apply_async`."""
        return self.apply_async()

    def _build(
        self, waits: list[str], values: list[str] | None, kind: str | None, steps: list[Step]
    ) -> tuple[list[str], list[str], str]:
        """Add this node's steps, after ``waits``, taking ``values`` (``kind`` one or
        list) as first argument; returns (ids to wait for, ids of its value, kind)."""
        raise NotImplementedError


class Signature(Canvas):
    """A task with arguments and options, not sent yet: ``task.s(1, 2)``.

    In a chain it receives the previous step's result as its first argument, unless
    it is immutable (``task.si(...)``)."""

    def __init__(
        self,
        task: Task,
        args: Iterable[Any] = (),
        kwargs: dict[str, Any] | None = None,
        *,
        immutable: bool = False,
        options: dict[str, Any] | None = None,
    ) -> None:
        self.task = task
        self.args = tuple(args)
        self.kwargs = dict(kwargs or {})
        self.immutable = immutable
        self.options: dict[str, Any] = {}
        self.set(**(options or {}))

    def __repr__(self) -> str:
        args = ", ".join([*map(repr, self.args), *(f"{k}={v!r}" for k, v in self.kwargs.items())])
        return f"{self.task.name}{'.si' if self.immutable else '.s'}({args})"

    def set(self, **options: Any) -> Signature:
        """Set options (queue, key, countdown, eta, expires, priority, task_id); returns
        the signature. In a workflow, a step's countdown starts when it is released."""
        unknown = set(options) - OPTIONS
        if unknown:
            raise ValueError(f"unknown signature option(s): {', '.join(sorted(unknown))}")
        self.options.update(options)
        return self

    def _build(
        self, waits: list[str], values: list[str] | None, kind: str | None, steps: list[Step]
    ) -> tuple[list[str], list[str], str]:
        takes_input = values is not None and not self.immutable
        opts = self.options
        key = opts.get("key")
        if key is None and self.task.key is not None:
            if takes_input:
                raise ValueError(
                    f"{self!r} gets the previous step's result as its first argument, so "
                    "its key function cannot run before it is sent: give the step its "
                    "key with .set(key=...)"
                )
            key = self.task.key(*self.args, **self.kwargs)
        countdown = opts.get("countdown")
        fields = timing(
            countdown=None if values is not None else countdown,
            eta=opts.get("eta"),
            expires=opts.get("expires"),
            priority=opts.get("priority"),
        )
        if values is not None and countdown is not None:
            # Counted from when the step is released: the broker turns it into an ETA.
            fields["countdown"] = seconds("countdown", countdown)
        header, payload = task_message(
            self.task.name,
            self.args,
            self.kwargs,
            queue=opts.get("queue") or self.task.queue,
            key=key,
            task_id=opts.get("task_id"),
            **fields,
        )
        if len(waits) > MAX_PARENTS:
            raise ValueError(
                f"{self!r} would wait for {len(waits)} tasks; a step may wait for at most "
                f"{MAX_PARENTS} (split a larger chord into chords of groups)"
            )
        if waits or values is not None:
            header["after"] = list(waits)
        if takes_input:
            assert values is not None and kind is not None
            header["args_from"] = list(values)
            header["pass"] = kind
        steps.append((self.task.app, header, payload))
        return [header["id"]], [header["id"]], "one"


class chain(Canvas):
    """Steps run one after another, each given the previous one's result."""

    def __init__(self, *steps: Canvas) -> None:
        flat: list[Canvas] = []
        for step in steps:
            flat.extend(step.steps if isinstance(step, chain) else [step])
        if not flat:
            raise ValueError("a chain needs at least one step")
        self.steps = flat

    def __repr__(self) -> str:
        return " | ".join(map(repr, self.steps))

    def _build(
        self, waits: list[str], values: list[str] | None, kind: str | None, steps: list[Step]
    ) -> tuple[list[str], list[str], str]:
        for step in self.steps:
            waits, values, kind = step._build(waits, values, kind, steps)
        assert values is not None and kind is not None
        return waits, values, kind


class group(Canvas):
    """Members run in parallel; the group's value is the list of their values (a
    member that is itself a group adds its values to the list, flattened)."""

    def __init__(self, *members: Canvas | Iterable[Canvas]) -> None:
        if len(members) == 1 and not isinstance(members[0], Canvas):
            members = tuple(members[0])
        self.members: list[Canvas] = list(members)  # type: ignore[arg-type]

    def __repr__(self) -> str:
        return f"group({', '.join(map(repr, self.members))})"

    def apply_async(self) -> GroupResult:  # type: ignore[override]
        """Send every member; returns their results, in order."""
        result = super().apply_async()
        assert isinstance(result, GroupResult)
        return result

    def _build(
        self, waits: list[str], values: list[str] | None, kind: str | None, steps: list[Step]
    ) -> tuple[list[str], list[str], str]:
        if not self.members:
            # Nothing to run: what follows still waits for what came before, and gets [].
            return waits, [], "list"
        all_waits: list[str] = []
        all_values: list[str] = []
        for member in self.members:
            member_waits, member_values, _ = member._build(waits, values, kind, steps)
            all_waits += member_waits
            all_values += member_values
        return all_waits, all_values, "list"


def chord(header: group | Iterable[Canvas], body: Canvas) -> chain:
    """Run the ``header`` group, then ``body`` with the list of its results."""
    members = header if isinstance(header, group) else group(list(header))
    return chain(members, body)


class GroupResult:
    """The results of a group's members, in order."""

    def __init__(self, results: list[AsyncResult]) -> None:
        self.results = results

    def __repr__(self) -> str:
        return f"<GroupResult of {len(self.results)}>"

    def __len__(self) -> int:
        return len(self.results)

    def __iter__(self) -> Iterator[AsyncResult]:
        return iter(self.results)

    def __getitem__(self, index: int) -> AsyncResult:
        return self.results[index]

    def get(self, timeout: float | None = None, *, propagate: bool = True) -> list[Any]:
        """Every member's value, in order; raises the first failure (unless
        ``propagate`` is False, which puts failures in the list)."""
        import time

        deadline = None if timeout is None else time.monotonic() + timeout
        values = []
        for result in self.results:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            values.append(result.get(left, propagate=propagate))
        return values

    def ready(self) -> bool:
        return all(r.ready() for r in self.results)

    def successful(self) -> bool:
        return all(r.successful() for r in self.results)

    def failed(self) -> bool:
        return any(r.failed() for r in self.results)

    def completed_count(self) -> int:
        return sum(r.successful() for r in self.results)

    def revoke(self, *, terminate: bool = False) -> None:
        for result in self.results:
            result.revoke(terminate=terminate)
