"""Image decoding started ahead in background threads, so the VAE never waits on a JPEG decoder."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")
_END = object()  # the end of the items


@dataclass
class Fetched(Generic[T, R]):
    """One item's outcome: its value, or the exception loading it raised (re-raised by :meth:`get`)."""

    item: T
    value: R | None = None
    error: BaseException | None = None

    def get(self) -> R:
        if self.error is not None:
            raise self.error
        return self.value  # type: ignore[return-value]


def _run(load: Callable[[T], R], item: T) -> Fetched[T, R]:
    try:
        return Fetched(item, load(item))
    except Exception as e:  # noqa: BLE001 — handed to the consumer, which decides (a bad image is reported)
        return Fetched(item, error=e)


def fetched_ahead(load: Callable[[T], R], items: Iterable[T], *, threads: int, depth: int) -> Iterator[Fetched[T, R]]:
    """``load(item)`` for every item, in order, computed up to ``depth`` items ahead by ``threads`` threads.

    Threads, not processes: Pillow releases the GIL while it decodes and resizes, the dataset needs no
    pickling, and nothing forks a process that has already started torch's thread pools. The order and
    the values are those of a plain loop (each item is loaded by the same function); an exception is
    returned in its item's place, so the consumer handles a bad file exactly where a loop would.
    ``threads=0`` loads in the calling thread, one item at a time.

    At most ``depth`` decoded items wait in memory (the caller sizes it: a batch or two of images).
    Leaving the loop early cancels what has not started and waits for what has.
    """
    if threads <= 0:
        for item in items:
            yield _run(load, item)
        return
    source = iter(items)
    pending: deque[Future[Fetched[T, R]]] = deque()
    pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="lowvram-decode")
    try:
        for item in source:
            pending.append(pool.submit(_run, load, item))
            if len(pending) >= max(1, depth):
                break
        while pending:
            done = pending.popleft().result()
            nxt = next(source, _END)
            if nxt is not _END:
                pending.append(pool.submit(_run, load, nxt))
            yield done
    finally:
        for f in pending:
            f.cancel()
        pool.shutdown(wait=True)

