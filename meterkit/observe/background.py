"""Observers that may block, moved off the request's path: :class:`Background`."""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable

from meterkit.errors import ConfigurationError
from meterkit.observe.events import Event, Observer, Observers

__all__ = ["Background"]


class Background:
    """Hand events to ``observer`` on a thread of its own, so that a slow observer (a
    network call, a remote log) never holds up a request.

    Events wait in a queue of at most ``capacity``; when it is full, new events are
    dropped and counted in :attr:`dropped` (a request is never made to wait for an
    observer). ``accept``, if given, picks the events worth queueing (it runs on the
    request's path: keep it to a comparison). The thread starts with the first event,
    and again in a process forked since (a pre-forking server's workers each get
    their own). :meth:`flush` waits until every queued event was handled; what
    ``observer`` raises is logged, as for any observer.
    """

    def __init__(
        self,
        observer: Observer,
        *,
        capacity: int = 10_000,
        accept: Callable[[Event], bool] | None = None,
    ) -> None:
        if not callable(observer):
            raise ConfigurationError("is a callable of an Event", "observer")
        if type(capacity) is not int or capacity < 1:
            raise ConfigurationError("is a whole number of events, at least 1", "capacity")
        self.observer = observer
        self.capacity = capacity
        self._accept = accept
        self._notify = Observers(observer).notify
        #: Events dropped because the queue was full.
        self.dropped = 0
        self._queue: queue.Queue[Event | None] = queue.Queue(capacity)
        self._lock = threading.Lock()
        self._pid = 0
        self._thread: threading.Thread | None = None

    def __repr__(self) -> str:
        return f"Background({self.observer!r}, queued={self._queue.qsize()})"

    def __call__(self, event: Event) -> None:
        accept = self._accept
        if accept is not None and not accept(event):
            return
        if self._pid != os.getpid():
            self._start()
        try:
            self._queue.put_nowait(event)
        except queue.Full:
            with self._lock:
                self.dropped += 1

    def _start(self) -> None:
        with self._lock:
            pid = os.getpid()
            if self._pid == pid:
                return
            if self._pid:  # forked: the parent's queue and its lock are not ours
                self._queue = queue.Queue(self.capacity)
            self._thread = threading.Thread(
                target=self._run, name=f"meterkit-{type(self.observer).__name__}", daemon=True
            )
            self._thread.start()
            self._pid = pid

    def _run(self) -> None:
        events = self._queue
        while True:
            event = events.get()
            try:
                if event is None:
                    return
                self._notify(event)
            finally:
                events.task_done()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every event queued so far was handled (at most ``timeout``
        seconds); whether they all were."""
        events = self._queue
        with events.all_tasks_done:
            if timeout is None:
                while events.unfinished_tasks:
                    events.all_tasks_done.wait()
                return True
            return events.all_tasks_done.wait_for(lambda: not events.unfinished_tasks, timeout)

    def close(self, timeout: float | None = None) -> None:
        """Handle what is queued (for at most ``timeout`` seconds), then stop the thread."""
        thread = self._thread
        if thread is None or self._pid != os.getpid():
            return
        self.flush(timeout)
        try:
            self._queue.put(None, timeout=timeout)
        except queue.Full:
            return
        thread.join(timeout)
        with self._lock:
            self._thread = None
            self._pid = 0
