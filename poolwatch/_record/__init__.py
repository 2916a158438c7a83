"""What poolwatch knows: plain state that capture writes and serve reads.

Per-pool recorders (counters, bucket arrays, the table of live checkouts), per-request statistics,
the request a checkout belongs to, the leak sweeper that keeps leak counts current, and the events
handed to sinks. Nothing here imports ``_capture`` or ``_serve``: both sides depend on this room,
never the other way round.
"""
