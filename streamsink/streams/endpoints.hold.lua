-- KEYS: gate hash. ARGV: µs from now. Nothing is sent before then (a Retry-After).
local hold = now + tonumber(ARGV[1])
local held = tonumber(redis.call('HGET', KEYS[1], 'hold'))
if held == nil or held < hold then redis.call('HSET', KEYS[1], 'hold', hold) end
redis.call('PEXPIRE', KEYS[1], 86400000)
return 0
