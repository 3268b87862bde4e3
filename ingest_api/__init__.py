"""The HTTP API: accept trades fast, answer status and trade reads."""
