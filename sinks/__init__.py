"""Bytewax sinks: the trade store, the status store and the dead-letter topic.

Every sink is at-least-once and idempotent, so a replay after a crash changes nothing visible.
"""
