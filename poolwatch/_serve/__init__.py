"""What reads the records and answers: the Prometheus collector and writers, ``/metrics``, the ASGI
middleware, health and its probe, the sidecar server and multi-worker merging.

Everything here reads ``_record`` and imports nothing from ``_capture``; it types against
``watched.Watched`` rather than the wiring module that builds a PoolWatch.
"""
