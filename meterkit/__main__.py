"""``python -m meterkit``: the same as the ``meterkit`` command."""

from meterkit.cli.parser import main

if __name__ == "__main__":  # (not when a documentation tool imports every module)
    raise SystemExit(main())
