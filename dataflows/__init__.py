"""The Bytewax dataflows, wired from sources, domain rules and sinks."""
