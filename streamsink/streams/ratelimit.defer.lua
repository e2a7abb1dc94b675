-- KEYS: state hash. ARGV: µs from now. No start is handed out before then.
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
local hold = now + tonumber(ARGV[1])
local held = tonumber(redis.call('HGET', KEYS[1], 'hold'))
if held == nil or held < hold then
  redis.call('HSET', KEYS[1], 'hold', hold)
  local ttl = redis.call('PTTL', KEYS[1])
  redis.call('PEXPIRE', KEYS[1], math.max(ttl, math.ceil(tonumber(ARGV[1]) / 1000) + 1000))
end
return 0
