-- KEYS: dead-letter stream, shard stream. ARGV: dead-letter ID, then the entry's field/value
-- pairs. Publishes the entry again only if the letter was still there (and is now gone).
if redis.call('XDEL', KEYS[1], ARGV[1]) == 0 then return false end
local fields = {}
for i = 2, #ARGV do fields[#fields + 1] = ARGV[i] end
return redis.call('XADD', KEYS[2], '*', unpack(fields))
