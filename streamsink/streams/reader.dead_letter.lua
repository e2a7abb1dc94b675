-- KEYS: lease, epoch, shard stream, dead-letter stream. ARGV: owner, epoch, group, entry id,
-- then the letter's field/value pairs (its reason, where from, and the entry's own fields
-- byte for byte: schemas/layout.py names them, ShardReader.dead_letter lays them out).
-- -1 if fenced, else XACK's reply.
if not owned(KEYS[1], KEYS[2], ARGV[1], ARGV[2]) then return -1 end
redis.call('XADD', KEYS[4], '*', unpack(ARGV, 5))
return redis.call('XACK', KEYS[3], ARGV[3], ARGV[4])
