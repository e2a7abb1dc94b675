-- KEYS: gate hash. ARGV: how long a probe may be out (µs). Returns {what, µs to wait,
-- failures in a row, last failure}: what is `hold` (a Retry-After runs), `open` (cool-down),
-- `half-open` (another's probe is out), `probe` (this request is the probe) or `closed`.
local g = redis.call('HMGET', KEYS[1], 'hold', 'until', 'probe', 'failures', 'last')
local hold, till, probe = tonumber(g[1]), tonumber(g[2]), tonumber(g[3])
local failures, last = tonumber(g[4]) or 0, g[5] or ''
if hold and hold > now then return {'hold', hold - now, failures, last} end
if not till then return {'closed', 0, failures, last} end
if now < till then return {'open', till - now, failures, last} end
if probe and probe > now then return {'half-open', probe - now, failures, last} end
redis.call('HSET', KEYS[1], 'probe', now + tonumber(ARGV[1]))
return {'probe', 0, failures, last}
