-- KEYS: shard stream, epoch counter. ARGV: group.
-- {stream exists (0/1), last generated ID, group exists (0/1), last delivered ID, epoch}
local epoch = redis.call('GET', KEYS[2]) or '0'
if redis.call('EXISTS', KEYS[1]) == 0 then return {0, '0-0', 0, '0-0', epoch} end
local last = field(redis.call('XINFO', 'STREAM', KEYS[1]), 'last-generated-id')
for _, group in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
  if field(group, 'name') == ARGV[1] then
    return {1, last, 1, field(group, 'last-delivered-id'), epoch}
  end
end
return {1, last, 0, '0-0', epoch}
