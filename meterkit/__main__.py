"""``python -m meterkit``: the same as the ``meterkit`` command."""

from meterkit.cli.commands import main

raise SystemExit(main())
