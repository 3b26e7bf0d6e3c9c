"""daemon/service.BackgroundTasks: a background loop that dies of a bug says so in the log, once,
in one line; cancelled and finished tasks say nothing."""

from __future__ import annotations

import asyncio
import logging

from daemon.service import BackgroundTasks


async def test_a_task_that_dies_of_an_exception_is_logged_in_one_line(caplog):
    """Hostile condition: a watcher loop raises (a bug). Without a line in the log it would stop
    silently and only what it no longer does would show."""

    async def watcher() -> None:
        raise KeyError("peer")

    async def fine() -> None:
        return None

    tasks = BackgroundTasks()
    with caplog.at_level(logging.INFO, logger="ntm.tasks"):
        tasks.spawn(watcher())
        tasks.spawn(fine())
        sleeper = tasks.spawn(asyncio.sleep(60))
        await asyncio.sleep(0.01)
        await tasks.cancel()
    assert sleeper.cancelled() and len(tasks) == 0
    lines = [r.getMessage() for r in caplog.records if r.name == "ntm.tasks"]
    assert len(lines) == 1 and "watcher" in lines[0] and "KeyError" in lines[0], lines
    assert all(r.exc_info is None for r in caplog.records)
