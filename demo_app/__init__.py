"""poolwatch's demo: a small users-and-posts API on async SQLAlchemy, watched by poolwatch."""
