"""Process-wide configuration: one typed Settings, logging and the business clock."""
