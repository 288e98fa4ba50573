"""The model registry: names, statuses, sources and pulls."""
