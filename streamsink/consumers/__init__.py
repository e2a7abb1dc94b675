"""The worker: runs each owned shard through windows, merges them, writes the sinks, acks."""
