-- KEYS: gate hash. A request succeeded: the breaker closes. Returns 1 if it was open.
local was = redis.call('HEXISTS', KEYS[1], 'until')
redis.call('HDEL', KEYS[1], 'until', 'probe', 'failures', 'last')
return was
