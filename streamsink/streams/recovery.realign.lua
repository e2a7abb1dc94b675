-- KEYS: shard stream, epoch counter. ARGV: group, epoch floor, stream floor, group floor
-- ('' to leave the group alone), '1' to set the group's last delivered ID to its floor even
-- if that lowers it ('' not).
-- Raises each to at least its floor in one step (a producer's XADD or a worker's INCR in
-- between cannot be undone): the epoch counter; the stream's last generated ID (XSETID,
-- the stream made if missing), so that new entries come after every offset; the group's
-- last delivered ID (made at the floor if missing).
local function before(a, b)
  local ams, aseq = string.match(a, '^(%d+)-(%d+)$')
  local bms, bseq = string.match(b, '^(%d+)-(%d+)$')
  ams, aseq, bms, bseq = tonumber(ams), tonumber(aseq), tonumber(bms), tonumber(bseq)
  return ams < bms or (ams == bms and aseq < bseq)
end
if tonumber(redis.call('GET', KEYS[2]) or '0') < tonumber(ARGV[2]) then
  redis.call('SET', KEYS[2], ARGV[2])
end
if redis.call('EXISTS', KEYS[1]) == 0 then
  if ARGV[4] == '' and ARGV[3] == '0-0' then return 0 end
  redis.call('XGROUP', 'CREATE', KEYS[1], ARGV[1], '0', 'MKSTREAM')
end
local last = field(redis.call('XINFO', 'STREAM', KEYS[1]), 'last-generated-id')
if before(last, ARGV[3]) then redis.call('XSETID', KEYS[1], ARGV[3]) end
if ARGV[4] == '' then return 1 end
for _, group in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
  if field(group, 'name') == ARGV[1] then
    if ARGV[5] == '1' or before(field(group, 'last-delivered-id'), ARGV[4]) then
      redis.call('XGROUP', 'SETID', KEYS[1], ARGV[1], ARGV[4])
    end
    return 1
  end
end
redis.call('XGROUP', 'CREATE', KEYS[1], ARGV[1], ARGV[4])
return 1
