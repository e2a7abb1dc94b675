-- KEYS: lease, epoch. ARGV: worker id, TTL ms. Returns the new epoch, or 0 if another owns it.
-- Every ownership takes a new epoch, also when this worker still holds the key (its shard
-- task was cancelled and starts again): work begun under the old one is then fenced.
local owner = redis.call('GET', KEYS[1])
if owner and owner ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return redis.call('INCR', KEYS[2])
