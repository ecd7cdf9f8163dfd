"""Building blocks the core and modules share (locks, caches)."""
