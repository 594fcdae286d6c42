"""Circuit breaking and retries: protection against failing services."""
