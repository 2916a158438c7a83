"""The connection limit that applies to a pool's role and database on its server.

Forty pods whose pools are each fine can together ask for more connections than the server allows
them; only the fleet's sum against the limit shows it (``PoolWatchFleetCapacityExceedsServer``).
Each pool reports that limit as ``poolwatch_server_connections_max``: ``limits`` says what to ask
each kind of server and what the answer means (a pooler in between claims none), ``reader`` when
and on which connection to ask. ``ensure_read`` is all the rest of poolwatch calls.
"""

from .reader import ensure_read

__all__ = ["ensure_read"]
