"""The project's benchmark harness (issue #4): see bench/README.md."""
