"""What runs on the application's threads: hooks on SQLAlchemy's pool and dialect instances,
pool event listeners, the borrow site, statement classification and the active trace.

Everything here writes into ``_record`` and imports nothing from ``_serve``.
"""
