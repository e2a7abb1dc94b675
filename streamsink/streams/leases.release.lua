-- KEYS: lease. ARGV: worker id. 1 if it was ours and is now free.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
