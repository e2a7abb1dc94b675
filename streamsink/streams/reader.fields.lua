-- KEYS: shard stream. ARGV: entry IDs. The fields of each as stored, {} for one gone.
local found = {}
for i, id in ipairs(ARGV) do
  local entry = redis.call('XRANGE', KEYS[1], id, id)[1]
  found[i] = entry and entry[2] or {}
end
return found
