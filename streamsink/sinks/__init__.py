"""Where merged batches go: PostgreSQL, HTTP callbacks, Redis read models, user functions."""
