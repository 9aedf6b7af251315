"""meterkit's benchmarks (pytest-benchmark); run with ``pytest bench/ --benchmark-only``."""
