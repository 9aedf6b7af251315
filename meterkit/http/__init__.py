"""The HTTP gate (sans-I/O) and its ASGI and WSGI shells."""
