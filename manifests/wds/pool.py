"""The worker processes of a WebDataset build: a ``multiprocessing`` pool, or its interface in-process."""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
from collections.abc import Callable, Iterator, Sequence
from typing import Any


def _init_worker(level: int) -> None:
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )


class _Deferred:
    """``AsyncResult`` stand-in for ``workers == 1``: runs the task in this process on the first ``get``."""

    def __init__(self, fn: Callable[[Any], Any], arg: Any):
        self._fn, self._arg, self._done, self._value = fn, arg, False, None

    def get(self) -> Any:
        if not self._done:
            self._value, self._done = self._fn(self._arg), True
        return self._value

    def ready(self) -> bool:
        return self._done

    def successful(self) -> bool:
        return self._done


class _InlinePool:
    """The part of ``multiprocessing.Pool`` the build uses (``apply_async``), running tasks in-process."""

    def apply_async(self, fn: Callable[[Any], Any], args: tuple[Any]) -> _Deferred:
        return _Deferred(fn, args[0])


@contextlib.contextmanager
def process_pool(workers: int, preload: Sequence[str]) -> Iterator[Any]:
    """A process pool of ``workers`` (in-process for 1); on leaving, unfinished tasks are stopped.

    Args:
        workers: number of processes, at least 1.
        preload: modules the fork server imports once, so that a worker does not import them per process
            (the modules of the task functions, and what those import on first use).

    Yields:
        an object with ``apply_async(fn, (arg,))`` returning an ``AsyncResult``-like ``get/ready/successful``.
    """
    if workers == 1:
        yield _InlinePool()
        return
    # not fork: the parent may hold pyarrow/tqdm threads, which a forked child must not inherit. The fork
    # server imports the preloaded modules once per session, so a pool starts without an import each.
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(list(preload))
    level = logging.getLogger().getEffectiveLevel()
    pool = context.Pool(workers, initializer=_init_worker, initargs=(level,))
    try:
        yield pool
    except BaseException:
        pool.terminate()
        raise
    else:
        pool.close()
    finally:
        pool.join()
