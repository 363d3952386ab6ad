"""The HTTP and WebSocket face of the server: a Quart-Trio app made of the API's blueprints
(``api/``: streams, status, pages, the signaling socket)."""

from __future__ import annotations

from quart_trio import QuartTrio

from .api.pages import pages_blueprint
from .api.services import Services
from .api.status import status_blueprint
from .api.streams import streams_blueprint
from .api.whep import whep_blueprint
from .api.ws import signaling_blueprint


def create_app(services: Services) -> QuartTrio:
    """The app for one server; its routes read and change the server through ``services``."""
    app = QuartTrio(__name__, static_folder=None)
    app.register_blueprint(pages_blueprint(services.static_dir))
    app.register_blueprint(status_blueprint(services))
    app.register_blueprint(streams_blueprint(services))
    app.register_blueprint(signaling_blueprint(services))
    app.register_blueprint(whep_blueprint(services))
    return app
