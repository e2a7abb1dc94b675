-- KEYS: gate hash. ARGV: failures that open it, cool-down µs, the failure, 1 if it was the
-- probe. Returns {1 if this failure opened it (again), 1 if it is open (or half-open)}.
local failures = redis.call('HINCRBY', KEYS[1], 'failures', 1)
redis.call('HSET', KEYS[1], 'last', ARGV[3])
local till = redis.call('HGET', KEYS[1], 'until')
local opened = 0
if (till and ARGV[4] == '1') or (not till and failures >= tonumber(ARGV[1])) then
  redis.call('HSET', KEYS[1], 'until', now + tonumber(ARGV[2]))
  redis.call('HDEL', KEYS[1], 'probe')
  opened = 1
end
redis.call('PEXPIRE', KEYS[1], 86400000)
return {opened, (till or opened == 1) and 1 or 0}
