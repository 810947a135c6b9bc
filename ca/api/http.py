"""The CA's plain HTTP side: the trust bundle, health, and metrics."""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ca.metrics import CaMetrics
from identity import TrustBundle
from identity.webserving import reports_progress

SPIFFE_BUNDLE_TYPE = "application/json"


def make_app(bundle: Callable[[], TrustBundle], metrics: CaMetrics) -> web.Application:
    """`bundle` is called per request so a rotated bundle is served at once."""

    async def get_bundle(request: web.Request) -> web.Response:
        wants_json = request.query.get("format") == "spiffe" or (
            "application/json" in request.headers.get("Accept", "")
        )
        if wants_json:
            return web.Response(body=bundle().to_spiffe_json(), content_type=SPIFFE_BUNDLE_TYPE)
        return web.Response(body=bundle().to_pem(), content_type="application/x-pem-file")

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def get_metrics(request: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    app = web.Application(middlewares=[reports_progress])  # for the idle timeout
    app.router.add_get("/bundle", get_bundle)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", get_metrics)
    return app
