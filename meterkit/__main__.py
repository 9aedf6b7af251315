"""``python -m meterkit``: the same as the ``meterkit`` command."""

from meterkit.cli.parser import main

raise SystemExit(main())
