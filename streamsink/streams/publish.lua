-- KEYS[1]: shard stream, KEYS[2]: its idempotency ids' index (`Keys.ids`). ARGV[1]: the
-- old dedup key prefix (`Keys.dedup_prefix`, read only), ARGV[2]: dedup TTL (ms), ARGV[3]:
-- max lag (0: none), ARGV[4]: memory ceiling as a fraction of maxmemory (0: none), ARGV[5]:
-- the shard's read-model key prefix (`Keys.row_prefix`), ARGV[6]: the stream's default
-- table ('' if none; a row's hash is `Keys.row`: prefix, table, ':', routing key), ARGV[7]:
-- where the shapes start (0: none; see below), then each
-- event either as `key, op, data` (no table, ts, v or id: most events, three values and one
-- XADD), as `key, '!', op, data, id` (an id and no table, ts or v: the idempotent publish's
-- usual shape; when every event of the call has it, the first is `key, '!!', op, data, id`
-- and the others `key, op, data, id`, without a mark each), or as
-- `key, '+', op, data, table, ts, v, id` ('' where absent), or, for a table
-- with a read model, as `key, shape mark, data` (a set of plain columns, no table, ts, v
-- or id, data without escapes: the HSET of the shape's key field to the key and its other
-- fields to their values in the data, read by the shape's pattern, then its TTL; the mark
-- starts with '='), `key, '*', op, data, changes` (any other without table, ts, v or id) or
-- `key, '#', op, data, table, ts, v, id, changes` (schemas.readmodel's
-- changer; the hash is changed only by a fresh publish, not a repeated one). Returns the entry
-- ID of each event; a repeated id returns the first publish's entry ID. After the events come
-- the shapes that events name: `mark, key field, TTL (ms), 1 if the TTL is only for a hash
-- without one else 0, pattern, field count, field names` (the names in the order the
-- pattern captures their values; streams/publish.py: shape_pattern), once per call. A
-- hash's TTL goes as PEXPIREAT of Redis' clock at the call plus the TTL, each distinct TTL
-- formatted once a call: a Lua number passed to Redis costs a formatting (~1.5 µs a call)
-- and PEXPIRE a rewrite into PEXPIREAT. The type check and the backpressure check come
-- first so that a refused call has written nothing.
--
-- Ids (see `Keys.ids`): at the call's first event with an id, `recall` looks up every id of
-- the call at once: one MGET of the old one-key-per-id layout and one HMGET per live bucket;
-- each event then costs its XADD only, and the call's new ids go into the current bucket of
-- the TTL's width with one HSET and one PEXPIREAT at the end (`remember`).
--
-- Lag (see `Backpressure`): per group, the entries it has not acknowledged: Redis' own
-- `lag` (entries added but not yet delivered to the group) plus its pending entries
-- (delivered, not yet committed and acknowledged), both from XINFO GROUPS: O(groups) per
-- call. Where Redis cannot tell a group's lag (entries deleted in the middle) XLEN stands
-- for it, as it does when the shard has no group yet: an upper bound, since the stream is
-- trimmed only below what every group acknowledged. A call is refused while the slowest
-- group's lag is at `max lag` or more, so a shard holds at most `max lag` + one batch.
-- streams/publish.py fills in the holes: --[[NAMES]] (the stream field names, quoted, in
-- wire order), --[[SET]] (the op of a set, quoted) and --[[HSET_BY_ARITY]] (the HSET of a
-- shape's key and k fields, their values read from the data, written out per k).
local names = {--[[NAMES]]}
local set = --[[SET]]
local kind = redis.call('TYPE', KEYS[1]).ok
if kind ~= 'stream' and kind ~= 'none' then
  return redis.error_reply('WRONGTYPE ' .. KEYS[1] .. ' holds a ' .. kind .. ', not a stream')
end
local limit = tonumber(ARGV[3])
if limit > 0 and kind == 'stream' then
  local lag, groups = 0, redis.call('XINFO', 'GROUPS', KEYS[1])
  if #groups == 0 then lag = redis.call('XLEN', KEYS[1]) end
  for _, group in ipairs(groups) do
    local info = {}
    for j = 1, #group, 2 do info[group[j]] = group[j + 1] end
    local behind = info['lag']
    if type(behind) ~= 'number' then behind = redis.call('XLEN', KEYS[1]) end
    lag = math.max(lag, behind + info['pending'])
  end
  if lag >= limit then
    return redis.error_reply('BACKPRESSURE lag ' .. lag .. ' ' .. limit)
  end
end
local ceiling = tonumber(ARGV[4])
if ceiling > 0 then
  local info = redis.call('INFO', 'memory')
  local most = tonumber(string.match(info, 'maxmemory:(%d+)'))
  if most and most > 0 then
    local used = tonumber(string.match(info, 'used_memory:(%d+)'))
    if used >= most * ceiling then
      return redis.error_reply(
        'BACKPRESSURE memory ' .. used .. ' ' .. math.floor(most * ceiling))
    end
  end
end
local function before(a, b)  -- a < b by bytes (Lua's < follows the server's locale)
  local n = math.min(#a, #b)
  for k = 1, n do
    local x, y = string.byte(a, k), string.byte(b, k)
    if x ~= y then return x < y end
  end
  return #a < #b
end
local function digits(x)  -- a numeric text ('-12.30'): negative?, its digits, its scale
  local negative = string.byte(x, 1) == 45
  if negative then x = string.sub(x, 2) end
  local whole, fraction = string.match(x, '^(%d+)%.?(%d*)$')
  return negative, (string.gsub(whole .. fraction, '^0+', '')), #fraction
end
local function plus(x, y)  -- x + y, of digit strings
  local out, carry, i, j = {}, 0, #x, #y
  while i > 0 or j > 0 or carry > 0 do
    local d = carry
    if i > 0 then d = d + string.byte(x, i) - 48 end
    if j > 0 then d = d + string.byte(y, j) - 48 end
    if d >= 10 then d, carry = d - 10, 1 else carry = 0 end
    out[#out + 1] = string.char(48 + d)
    i, j = i - 1, j - 1
  end
  return string.reverse(table.concat(out))
end
local function minus(x, y)  -- x - y, of digit strings, x >= y
  local out, borrow, i, j = {}, 0, #x, #y
  while i > 0 do
    local d = string.byte(x, i) - 48 - borrow
    if j > 0 then d = d - string.byte(y, j) + 48 end
    if d < 0 then d, borrow = d + 10, 1 else borrow = 0 end
    out[#out + 1] = string.char(48 + d)
    i, j = i - 1, j - 1
  end
  return string.reverse(table.concat(out))
end
local function decimal_add(a, b)  -- the exact sum of two numeric texts of one scale
  local a_negative, a_digits, scale = digits(a)
  local b_negative, b_digits = digits(b)
  local negative, sum = a_negative, nil
  if a_negative == b_negative then
    sum = plus(a_digits, b_digits)
  elseif #a_digits > #b_digits or (#a_digits == #b_digits and not before(a_digits, b_digits)) then
    sum = minus(a_digits, b_digits)
  else
    negative, sum = b_negative, minus(b_digits, a_digits)
  end
  sum = string.gsub(sum, '^0+', '')
  local zero = sum == ''
  if #sum <= scale then sum = string.rep('0', scale + 1 - #sum) .. sum end
  if scale > 0 then sum = string.sub(sum, 1, #sum - scale) .. '.' .. string.sub(sum, -scale) end
  if negative and not zero then sum = '-' .. sum end
  return sum
end
local function better(kind, order, old)  -- is `order` past `old` (max: greater, min: less)?
  if not old then return true end
  if string.sub(order, 1, 1) == 'n' then
    local x, y = tonumber(string.sub(order, 2)), tonumber(string.sub(old, 2))
    if kind == '>' then return x > y else return x < y end
  end
  if kind == '>' then return before(old, order) else return before(order, old) end
end
local clock, expiries = nil, {}
local function millis()  -- Redis' clock in ms, read once a call
  if not clock then
    local time = redis.call('TIME')
    clock = time[1] * 1000 + math.floor(time[2] / 1000)
  end
  return clock
end
local function expiry(ttl)  -- the time `ttl` (ms, text) from now, as text: PEXPIREAT's
  local at = expiries[ttl]  -- argument costs Redis less than PEXPIRE's (no rewrite of the
  if not at then            -- command into PEXPIREAT for replication), once a TTL a call
    at = string.format('%d', millis() + tonumber(ttl))
    expiries[ttl] = at
  end
  return at
end
local function model(row, at, apply)  -- the read model: one event's changes to its hash
  local ttl, assigns = ARGV[at], tonumber(ARGV[at + 1])
  if assigns < 0 then
    if apply then
      redis.call('DEL', row)
      redis.call('HSET', row, '~del', '1')
      redis.call('PEXPIREAT', row, expiry(ttl))
    end
    return at + 2
  end
  local j = at + 2
  if apply and assigns > 0 then redis.call('HSET', row, unpack(ARGV, j, j + 2 * assigns - 1)) end
  j = j + 2 * assigns
  local others = tonumber(ARGV[j])
  j = j + 1
  if apply then
    for k = j, j + 4 * others - 4, 4 do
      local name, kind, value, order = ARGV[k], ARGV[k + 1], ARGV[k + 2], ARGV[k + 3]
      local added = true
      if kind == 'x' then  -- null: no field
        redis.call('HDEL', row, name, '~o:' .. name)
      elseif kind == 'i' or kind == 'f' or kind == 'd' then
        local old = redis.call('HGET', row, name)
        if not old then
          redis.call('HSET', row, name, value)
        elseif kind == 'i' then  -- past 64 bits: an error reply, not a raised error
          added = redis.pcall('HINCRBY', row, name, value)
        elseif kind == 'd' then  -- numeric: exact, as text
          redis.call('HSET', row, name, decimal_add(old, value))
        else  -- Redis adds in long double: past the largest double is refused here
          added = redis.pcall('HINCRBYFLOAT', row, name, value)
          local sum = tonumber(added)
          if sum and (sum == math.huge or sum == -math.huge or sum ~= sum) then
            added = {err = 'not a finite double'}
          end
        end
        if type(added) == 'table' and added.err then
          -- a sum the hash cannot hold (the sink refuses it too): the hash is dropped, so a
          -- read falls back to PostgreSQL, and the entry is published whatever the hash
          redis.call('DEL', row)
          return j + 4 * others
        end
      elseif better(kind, order, redis.call('HGET', row, '~o:' .. name)) then
        redis.call('HSET', row, name, value, '~o:' .. name, order)
      end
    end
    if string.byte(ttl, 1) ~= 45 then  -- '-': only for a hash without a TTL
      redis.call('PEXPIREAT', row, expiry(ttl))
    else
      redis.call('PEXPIREAT', row, expiry(string.sub(ttl, 2)), 'NX')
    end
  end
  return j + 4 * others
end
local ids, count = {}, 0
local rows = ARGV[5]
local home = rows .. ARGV[6] .. ':'  -- the row hashes of the default table, but for the key
local shapes, i, n = {}, 8, #ARGV
local tail = tonumber(ARGV[7])
if tail > 0 then
  n = tail - 1
  local j = tail
  while j <= #ARGV do
    local k = tonumber(ARGV[j + 5])
    local shape = {unpack(ARGV, j + 6, j + 5 + k)}
    shape.key, shape.nx = ARGV[j + 1], ARGV[j + 3] == '1'
    shape.pattern, shape.at = ARGV[j + 4], expiry(ARGV[j + 2])
    shapes[ARGV[j]] = shape
    j = j + 6 + k
  end
end
local known, now, live, added, adds = nil, nil, nil, {}, 0  -- id -> first entry ID or false
local function walk(i, last)  -- the ids of the events from ARGV[i] on, each once
  local found, count = {}, 0
  while i <= last do
    local form, id = ARGV[i + 1], ''
    if form == '!' then
      id, i = ARGV[i + 4], i + 5
    elseif form == '!!' then  -- to the end: key, op, data, id each after the first
      for j = i + 4, last, 4 do
        id = ARGV[j]
        if known[id] == nil then
          known[id], count = false, count + 1
          found[count] = id
        end
      end
      id, i = '', last + 1
    elseif form == '+' then
      id, i = ARGV[i + 7], i + 8
    elseif form == '#' then
      id, i = ARGV[i + 7], model(nil, i + 8, false)
    elseif form == '*' then
      i = model(nil, i + 4, false)
    else  -- key, op, data, or key, shape mark, data
      i = i + 3
    end
    if id ~= '' and known[id] == nil then
      known[id], count = false, count + 1
      found[count] = id
    end
  end
  return found
end
local function recall(i, last)  -- what every id from event ARGV[i] on was first published as
  known = {}
  local ids = walk(i, last)
  now = string.format('%d', millis())
  live = redis.call('ZRANGE', KEYS[2], '(' .. now, '+inf', 'BYSCORE', 'WITHSCORES')
  for start = 1, #ids, 4000 do  -- unpack takes at most ~8000 values
    local stop, old = math.min(start + 3999, #ids), {}
    for k = start, stop do old[k - start + 1] = ARGV[1] .. ids[k] end
    local firsts = redis.call('MGET', unpack(old))
    for b = 1, #live, 2 do
      local got = redis.call('HMGET', KEYS[2] .. ':' .. live[b], unpack(ids, start, stop))
      for k = 1, #got do firsts[k] = firsts[k] or got[k] end
    end
    for k = start, stop do known[ids[k]] = firsts[k - start + 1] end
  end
end
local SEARCHED = 'a listpack (small hashes) is searched field by field, 1-4 us an id lookup'
local function remember()  -- the call's new ids (`added`: id, entry ID, ...), one bucket
  local ttl, width = tonumber(ARGV[2]), 1
  while width * 2 < ttl do width = width * 2 end  -- the power of two in [ttl / 2, ttl)
  local number = math.floor(tonumber(now) / width)
  local member = string.format('%d:%d', width, number)
  local bucket = KEYS[2] .. ':' .. member
  local ends, current, last = (number + 1) * width + ttl, nil, 0
  for b = 1, #live, 2 do
    local score = tonumber(live[b + 1])
    if live[b] == member then current = score end
    if score > last then last = score end
  end
  if not current then  -- a new bucket: a value past 64 bytes makes it a hash table at once
    added[adds + 1], added[adds + 2], adds = '', SEARCHED, adds + 2  -- ('' is no id)
  end
  for start = 1, adds, 4000 do  -- unpack takes at most ~8000 values
    redis.call('HSET', bucket, unpack(added, start, math.min(start + 3999, adds)))
  end
  if current and current > ends then ends = current end  -- a longer TTL's ids are there too
  redis.call('PEXPIREAT', bucket, string.format('%d', ends))  -- each call: never without a TTL
  if current ~= ends then  -- a new bucket (or a longer TTL): listed, old ones dropped
    redis.call('ZADD', KEYS[2], string.format('%d', ends), member)
    redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
    if ends > last then redis.call('PEXPIREAT', KEYS[2], string.format('%d', ends)) end
  end
end
local function identified(key, op, data, id)  -- the entry ID of a '!' event, added if new
  local entry = known[id]
  if not entry then
    entry = redis.call('XADD', KEYS[1], '*', names[1], key, names[2], op, names[3], data,
      names[7], id)
    known[id] = entry
    added[adds + 1], added[adds + 2], adds = id, entry, adds + 2
  end
  return entry
end
while i <= n do
  local entry = false
  local form = ARGV[i + 1]
  local shape = shapes[form]
  if shape then  -- key, shape mark, data (read model, plain set)
    entry = redis.call('XADD', KEYS[1], '*', names[1], ARGV[i], names[2], set, names[3], ARGV[i + 2])
    local row, k = home .. ARGV[i], #shape
    --[[HSET_BY_ARITY]]
    if shape.nx then
      redis.call('PEXPIREAT', row, shape.at, 'NX')
    else
      redis.call('PEXPIREAT', row, shape.at)
    end
    i = i + 3
  elseif form == '*' then  -- key, '*', op, data, the row's changes (read model)
    entry = redis.call(
      'XADD', KEYS[1], '*', names[1], ARGV[i], names[2], ARGV[i + 2], names[3], ARGV[i + 3])
    i = model(home .. ARGV[i], i + 4, true)
  elseif form == '!' then  -- key, '!', op, data, id: what the '+' form does, in fewer steps
    if not known then recall(i, n) end
    entry = identified(ARGV[i], ARGV[i + 2], ARGV[i + 3], ARGV[i + 4])
    i = i + 5
  elseif form == '!!' then  -- the same for every event to the end, each without its mark
    if not known then recall(i, n) end
    local key, j = ARGV[i], i + 2  -- then op, data and id (the first event's after its mark)
    while true do
      local id = ARGV[j + 2]
      entry = known[id]
      if not entry then
        entry = redis.call('XADD', KEYS[1], '*', names[1], key, names[2], ARGV[j], names[3],
          ARGV[j + 1], names[7], id)
        known[id] = entry
        added[adds + 1], added[adds + 2], adds = id, entry, adds + 2
      end
      if j + 3 > n then break end
      count = count + 1
      ids[count] = entry
      key, j = ARGV[j + 3], j + 4
    end
    i = n + 1
  elseif form ~= '+' and form ~= '#' then
    entry = redis.call(
      'XADD', KEYS[1], '*', names[1], ARGV[i], names[2], ARGV[i + 1], names[3], ARGV[i + 2])
    i = i + 3
  else
    local eid = ARGV[i + 7]
    if eid ~= '' then
      if not known then recall(i, n) end
      entry = known[eid]
    end
    local fresh = not entry
    if fresh then
      local fields = {names[1], ARGV[i]}
      for j = 2, 7 do
        local value = ARGV[i + j]
        if value ~= '' then
          fields[#fields + 1] = names[j]
          fields[#fields + 1] = value
        end
      end
      entry = redis.call('XADD', KEYS[1], '*', unpack(fields))
      if eid ~= '' then
        known[eid] = entry
        added[adds + 1], added[adds + 2], adds = eid, entry, adds + 2
      end
    end
    if form == '#' then  -- then the row's changes (a repeated publish's are in the hash
      local named = ARGV[i + 4]  -- already: skipped)
      local row = named == '' and home .. ARGV[i] or rows .. named .. ':' .. ARGV[i]
      i = model(row, i + 8, fresh)
    else
      i = i + 8
    end
  end
  count = count + 1
  ids[count] = entry
end
if adds > 0 then remember() end
return ids
