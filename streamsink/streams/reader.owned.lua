-- Every script that writes on behalf of the shard's owner (acknowledge, dead-letter, claim)
-- first checks that the caller still holds the lease under its epoch: a worker paused
-- past its lease (GC, SIGSTOP, a frozen VM), or a task of an earlier ownership by the same
-- worker, gets `Fenced` instead of touching what the next owner now handles.
local function owned(lease, epoch, owner, held)
  return redis.call('GET', lease) == owner and (redis.call('GET', epoch) or '0') == held
end
