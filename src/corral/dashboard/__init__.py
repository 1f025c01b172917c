"""The scheduler's web dashboard (``/status``) and Prometheus ``/metrics``.

Served by the scheduler process itself, in its event loop, with aiohttp
(:mod:`corral.dashboard.server`); the page is plain HTML/JS/CSS under
``static/`` (no build step) and updates over a WebSocket.  Everything it
shows comes from :class:`corral.scheduler.observer.Observer`.
"""
