-- KEYS: lease, epoch, shard stream, dead-letter stream. ARGV: owner, epoch, group, entry id,
-- reason, deliveries, time ms, sinks (comma-separated, '' for all), origin (the first
-- entry ID of a replayed event, '' for none), then the entry's original field/value pairs
-- (kept byte for byte as `f:<name>`). -1 if fenced, else XACK's reply.
if not owned(KEYS[1], KEYS[2], ARGV[1], ARGV[2]) then return -1 end
local fields = {'reason', ARGV[5], 'entry', ARGV[4], 'group', ARGV[3],
                'deliveries', ARGV[6], 'at_ms', ARGV[7], 'source', KEYS[3]}
if ARGV[8] ~= '' then
  fields[#fields + 1] = 'sinks'
  fields[#fields + 1] = ARGV[8]
end
if ARGV[9] ~= '' then
  fields[#fields + 1] = 'origin'
  fields[#fields + 1] = ARGV[9]
end
for i = 10, #ARGV, 2 do
  fields[#fields + 1] = 'f:' .. ARGV[i]
  fields[#fields + 1] = ARGV[i + 1]
end
redis.call('XADD', KEYS[4], '*', unpack(fields))
return redis.call('XACK', KEYS[3], ARGV[3], ARGV[4])
