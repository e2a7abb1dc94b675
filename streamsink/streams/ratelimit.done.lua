-- KEYS: window zset. ARGV: member. The send is done: from now on it counts for one second.
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
local score = tonumber(redis.call('ZSCORE', KEYS[1], ARGV[1]))
if score and score > now then redis.call('ZADD', KEYS[1], now, ARGV[1]) end
return 0
