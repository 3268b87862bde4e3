"""The ``trade-store`` command line: serve, process, migrate, expire, topics."""
