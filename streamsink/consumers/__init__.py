"""Reading shards through consumer groups, merging windows, leases (the workers)."""
