-- KEYS: state hash, window zset. Returns {exists, tat - now µs, hold - now µs, window
-- count, PTTL ms}: what `limits show` prints.
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
local state = redis.call('HMGET', KEYS[1], 'tat', 'hold')
local tat, hold = tonumber(state[1]) or now, tonumber(state[2]) or now
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - 1000000)
return {redis.call('EXISTS', KEYS[1]), math.max(0, tat - now), math.max(0, hold - now),
        redis.call('ZCARD', KEYS[2]), redis.call('PTTL', KEYS[1])}
