"""Bytewax sinks: the trade store, the status store and the dead-letter topic.

Every sink is at-least-once. The trade and status sinks are idempotent (the decision log),
so a replay after a crash changes no row and no status; the dead-letter sinks may then
store a letter twice.
"""
