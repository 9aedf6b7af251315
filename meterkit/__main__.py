"""``python -m meterkit``: the same as the ``meterkit`` command."""

from meterkit._cli import main

raise SystemExit(main())
