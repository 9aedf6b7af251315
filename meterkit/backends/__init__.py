"""Backends: where limits and credits are kept and the one atomic step runs."""
