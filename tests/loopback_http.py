"""An aiohttp server on a loopback port (a free one, or the one given: a test can stop it and start it
again at the same address), in the test's event loop; every method and path goes to `_handle`. The
receivers the tests talk to (webhooks, Twilio) are made of it."""

from __future__ import annotations

from aiohttp import web


class LoopbackHttpServer:
    def __init__(self, port: int = 0) -> None:
        self.port = port
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _handle(self, request: web.Request) -> web.Response:
        raise NotImplementedError
