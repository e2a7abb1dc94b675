-- KEYS: the row's hash. ARGV: TTL ms, then field, value pairs. Writes only if the hash does
-- not exist: a publish since the miss holds newer changes.
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return 1
