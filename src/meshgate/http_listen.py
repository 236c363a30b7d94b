"""One aiohttp application on one TCP address: the admin API and the delegation endpoint."""

from __future__ import annotations

from aiohttp import web

from meshgate.errors import ConfigError


async def listen(
    app: web.Application, host: str, port: int, what: str
) -> tuple[web.AppRunner, int]:
    """The running app and the port bound (0 asks the OS for one); ConfigError saying `what`
    could not listen, and why, instead of an OSError's traceback."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except OSError as exc:
        await runner.cleanup()
        raise ConfigError(f"cannot listen for {what} on {host}:{port}: {exc.strerror}") from None
    return runner, int(runner.addresses[0][1]) if runner.addresses else port
