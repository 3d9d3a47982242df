"""An asyncio resource for synchronous code: built on a background event-loop thread, once per process.

The sync writer (`pipeline/sync_client.py`) and the sync reader (`pipeline/read.py`) hold their
asyncio client here. Any thread may call it at once: each call is a coroutine handed to the one
loop thread, and the caller's thread waits for its answer.

After `os.fork` the child has no loop thread (fork copies only the thread that forked), and the
sockets it inherited belong to the parent's connections. So a child that uses an inherited
resource builds its own, on a loop thread of its own, at its first call: the fork hook below drops
the parent's state in every child (it is kept referenced, never closed, so that nothing of it is
collected and no socket of the parent is touched), and a pid check catches anything the hook did
not see. This is what gunicorn workers and Celery's prefork pool need: a writer made at import in
the master works in every worker.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import os
import threading
import weakref
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")

CLOSE_TIMEOUT_S = 10.0


class LoopThread:
    """One event loop running on a daemon thread; coroutines are submitted from any thread."""

    def __init__(self, name: str) -> None:
        self.pid = os.getpid()
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def run(self, coro: Coroutine[Any, Any, R], timeout: float | None = None) -> R:
        """Run `coro` on the loop and wait for its result (its exception is raised here)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(CLOSE_TIMEOUT_S)
        if not self._thread.is_alive():
            self.loop.close()


class _State(Generic[T]):
    def __init__(self, thread: LoopThread, value: T) -> None:
        self.thread = thread
        self.value = value
        self.pid = thread.pid


class PerProcess(Generic[T]):
    """`make()` run on a loop thread at first use, in this process; `close(value)` at `close()` or exit."""

    def __init__(
        self, name: str, make: Callable[[], Awaitable[T]], close: Callable[[T], Awaitable[None]]
    ) -> None:
        self.name = name
        self._make = make
        self._close = close
        self._lock = threading.Lock()
        self._state: _State[T] | None = None
        self._closed = False
        _LIVE.add(self)

    def get(self) -> tuple[LoopThread, T]:
        """The loop thread and the value of this process, built now if this process has none."""
        state = self._state
        if state is None or state.pid != os.getpid():
            state = self._build()
        return state.thread, state.value

    def call(self, fn: Callable[[T], Coroutine[Any, Any, R]]) -> R:
        """`await fn(value)` on the loop thread; its result, or its exception, in the calling thread."""
        thread, value = self.get()
        return thread.run(fn(value))

    def _build(self) -> _State[T]:
        with self._lock:
            if self._closed:
                raise RuntimeError(f"{self.name} is closed")
            state = self._state
            if state is not None and state.pid == os.getpid():
                return state  # another thread built it while this one waited
            if state is not None:
                _ORPHANS.append(state)  # the parent's: keep it, never close it (see the module doc)
                self._state = None
            thread = LoopThread(self.name)
            try:
                value = thread.run(_call(self._make))
            except BaseException:
                thread.stop()
                raise
            self._state = _State(thread, value)
            return self._state

    def close(self) -> None:
        """Close this process's value and stop its loop thread (a later call raises RuntimeError)."""
        with self._lock:
            self._closed = True
            state, self._state = self._state, None
        if state is None or state.pid != os.getpid():
            return
        try:
            state.thread.run(_call(lambda: self._close(state.value)), CLOSE_TIMEOUT_S)
        finally:
            state.thread.stop()

    def _forked(self) -> None:
        """In a new child: the lock may have been held by a thread that does not exist here."""
        self._lock = threading.Lock()
        if self._state is not None:
            _ORPHANS.append(self._state)
            self._state = None


async def _call(make: Callable[[], Awaitable[T]]) -> T:
    return await make()


_LIVE: weakref.WeakSet[PerProcess[Any]] = weakref.WeakSet()
_ORPHANS: list[_State[Any]] = []  # states inherited through fork: referenced, so never collected


def _after_fork_in_child() -> None:
    for resource in list(_LIVE):
        resource._forked()


def _close_all_at_exit() -> None:
    for resource in list(_LIVE):
        with contextlib.suppress(Exception):  # exiting anyway: a broker that does not answer must not hang it
            resource.close()


os.register_at_fork(after_in_child=_after_fork_in_child)
atexit.register(_close_all_at_exit)
