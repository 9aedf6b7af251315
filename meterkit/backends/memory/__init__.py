"""The in-memory backend: the algorithms in Python, one lock."""
