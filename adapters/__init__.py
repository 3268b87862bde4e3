"""One module per external system, each implementing a role from ``domain.ports``; ``retry``
waits out their outages."""
