"""The coordinator: a Flower ServerApp that aggregates adapter updates, never raw data."""
