"""The HTTP and WebSocket routes, one Quart blueprint per concern (put together in ``app.py``).

    streams.py    ``/api/streams``, ``/api/streams/<id>`` (GET, POST, PUT, PATCH, DELETE),
                  ``…/start``, ``…/stop``, ``…/snapshot.jpg``
    status.py     ``/healthz`` (liveness), ``/api/stats`` (sockets, sessions, peer connections,
                  sources, tasks, threads; admin), ``/metrics`` (Prometheus; admin),
                  ``/api/openapi.json`` (``openapi.json`` beside the package: every route here
                  but ``/ws`` and the pages)
    pages.py      ``/``, ``/favicon.ico``, ``/static/…``: pages and scripts, never served stale
    ws.py         ``/ws``: the signaling socket (``docs/protocol.md``)
    whep.py       ``/whep/<streamId>``: WHEP players (offer, trickle, delete; CORS)

    services.py   what the routes are given: the registry, the signaling hub, the store…
    access.py     who the caller is (access tokens), and error bodies

With ``[security]`` configured, ``/ws`` and ``/api`` need an access token (``docs/security.md``):
the ``token`` query parameter or an ``Authorization: Bearer`` header. Pages and scripts are
public: they hold no secrets.
"""
