-- On a Redis Cluster (see ShardReader._read_by_script), the read too:
-- KEYS: lease, epoch, shard stream. ARGV: owner (= consumer), epoch, group, count.
-- {0}: not the owner. {1, XREADGROUP's reply or 0 if none, the newest entry (XREVRANGE)}.
if not owned(KEYS[1], KEYS[2], ARGV[1], ARGV[2]) then return {0} end
local read = redis.call('XREADGROUP', 'GROUP', ARGV[3], ARGV[1], 'COUNT', ARGV[4],
                        'STREAMS', KEYS[3], '>')
return {1, read or 0, redis.call('XREVRANGE', KEYS[3], '+', '-', 'COUNT', 1)}
