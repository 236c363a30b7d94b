"""The process edge every command shares: one-line failures, logging, running until a signal."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import typer

from meshgate.cli.output import err_console
from meshgate.errors import MeshgateError

INSECURE_SERVE = (
    "xDS is plaintext and needs no join token, and sidecars reach gateways without mTLS: "
    "any process that reaches the xDS port receives every credential and key"
)


def fail(message: str) -> typer.Exit:
    """Print `error: message` on stderr; the caller raises the returned exit (status 1)."""
    err_console.print(f"[red]error:[/red] {message}", highlight=False, markup=True)
    return typer.Exit(1)


def warn_insecure(what: str) -> None:
    err_console.print(
        f"[bold red]WARNING: --insecure[/bold red]: {what}. Never use this outside a lab.",
        highlight=False,
    )


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("aiohttp").setLevel(logging.WARNING)


def run_until_signal(main: Callable[[asyncio.Event], Awaitable[None]]) -> None:
    """Run `main(stop)`; SIGINT/SIGTERM set `stop` so everything shuts down in order."""

    async def runner() -> None:
        # nothing a long-running meshgate process writes (keys, tokens, audit store, spools,
        # logs) is for other users, agents above all
        os.umask(0o077)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await main(stop)

    try:
        asyncio.run(runner())
    except MeshgateError as exc:
        raise fail(str(exc)) from None


async def wait_either(stop: asyncio.Event, other: Awaitable[Any]) -> None:
    """Return when `stop` is set or `other` ends (Envoy exited), cancelling the other."""
    stop_task = asyncio.ensure_future(stop.wait())
    other_task = asyncio.ensure_future(other)
    await asyncio.wait({stop_task, other_task}, return_when=asyncio.FIRST_COMPLETED)
    for task in (stop_task, other_task):
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
