-- KEYS: lease, epoch, shard stream, applied watermark. ARGV: owner, epoch, group, the IDs
-- joined by spaces, the watermark ('' to leave it). Acknowledges them all (the IDs travel
-- as one argument, packed in 0.1 µs an ID instead of redis-py's 1 µs an argument) and
-- moves the watermark forward, never back. -1 if fenced, else how many were acknowledged.
if not owned(KEYS[1], KEYS[2], ARGV[1], ARGV[2]) then return -1 end
local ids, n, acked = {}, 0, 0
for id in string.gmatch(ARGV[4], '%S+') do
  n = n + 1
  ids[n] = id
  if n == 1000 then
    acked = acked + redis.call('XACK', KEYS[3], ARGV[3], unpack(ids))
    ids, n = {}, 0
  end
end
if n > 0 then acked = acked + redis.call('XACK', KEYS[3], ARGV[3], unpack(ids)) end
if ARGV[5] ~= '' then
  local function parts(id)
    local ms, seq = string.match(id, '^(%d+)-(%d+)$')
    return tonumber(ms), tonumber(seq)
  end
  local was = redis.call('GET', KEYS[4])
  local ms, seq = parts(ARGV[5])
  local old_ms, old_seq = 0, -1
  if was then old_ms, old_seq = parts(was) end
  if ms > old_ms or (ms == old_ms and seq > old_seq) then
    redis.call('SET', KEYS[4], ARGV[5])
  end
end
return acked
