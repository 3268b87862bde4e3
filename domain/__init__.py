"""The business: trades, request statuses and the rules, as pure values and functions.

Nothing here does I/O or reads a clock; "today" is always an argument.
"""
