"""The command line: ``meterkit policy check``, ``simulate``, ``keys``, ``demo``."""
