"""The operator's dashboard: a read-only web page over the coordinator's jobs, rounds and specialists.

``app.py``: the ASGI application (Starlette) and its JSON API; ``data.py``: what it reads from
the state directory, read-only; ``server.py``: the listener (mutual TLS with operator
certificates, or plain HTTP on loopback); ``static/``: the page, its script and the vendored
Chart.js.
"""
