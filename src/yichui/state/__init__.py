"""The state layer: the only code that talks to Redis."""
