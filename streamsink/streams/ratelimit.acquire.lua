-- KEYS: state hash, window zset. ARGV: T µs, tolerance µs ((burst-1)*T), min gap µs,
-- reserve (0/1), cap (0: no window), busy µs, member. The window holds one member per send:
-- score = when it was done, or (still in flight) start + busy, a time after now.
-- reserve=0 takes a start only if it is now; reserve=1 books the earliest one.
-- Returns {1 if taken, µs from now to the start, the start in µs}.
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
local period, tolerance, gap = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local cap, busy = tonumber(ARGV[5]), tonumber(ARGV[6])
local state = redis.call('HMGET', KEYS[1], 'tat', 'last', 'hold')
local tat = math.max(tonumber(state[1]) or now, now)
local start = math.max(now, tat - tolerance)
local last, hold = tonumber(state[2]), tonumber(state[3])
if last then start = math.max(start, last + gap) end
if hold then start = math.max(start, hold) end
if cap > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - 1000000)
  local room = cap - redis.call('ZCOUNT', KEYS[2], '(' .. now, '+inf')
  if room <= 0 then return {0, math.max(1000, math.min(period, 50000)), 0} end
  local done = redis.call('ZREVRANGEBYSCORE', KEYS[2], now, '-inf', 'WITHSCORES',
                          'LIMIT', room - 1, 1)
  if done[2] then start = math.max(start, tonumber(done[2]) + 1000000) end
end
if start > now and ARGV[4] ~= '1' then return {0, math.ceil(start - now), start} end
tat = math.max(tat, start) + period
redis.call('HSET', KEYS[1], 'tat', tat, 'last', start)
redis.call('PEXPIRE', KEYS[1], math.ceil((math.max(tat, start + gap) - now) / 1000) + 1000)
if cap > 0 then
  redis.call('ZADD', KEYS[2], start + busy, ARGV[7])
  local keep = math.ceil((start + busy - now) / 1000) + 2000
  if redis.call('PTTL', KEYS[2]) < keep then redis.call('PEXPIRE', KEYS[2], keep) end
end
return {1, math.ceil(start - now), start}
