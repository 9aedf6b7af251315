-- meterkit ledger trim: drop the stream entries every drain has confirmed, and the
-- consumers that have long been gone with nothing pending.
--
-- KEYS[1] a ledger stream
-- ARGV    1 idle ms after which a consumer with nothing pending is forgotten
-- Reply   the stream's length after trimming
--
-- An entry is confirmed once every consumer group has acknowledged it: it is older
-- than the group's oldest pending entry (or, with none pending, than everything it
-- was delivered). The stream keeps every entry from the oldest such point of any
-- group on; with no group at all, nothing is confirmed and nothing goes. So the
-- stream's length is bounded by what the drains confirmed, never by dropping events.
-- A consumer is forgotten only with nothing pending, checked here, in the same step
-- (forgetting one that holds entries would drop them from the group's pending list).

local stream = KEYS[1]
if redis.call('EXISTS', stream) == 0 then
  return 0
end
local groups = redis.call('XINFO', 'GROUPS', stream)
if #groups == 0 then
  return redis.call('XLEN', stream)
end
local idle_ms = tonumber(ARGV[1])

local function fields(list)
  local t = {}
  for i = 1, #list, 2 do
    t[list[i]] = list[i + 1]
  end
  return t
end

local function id_of(text)
  local ms, seq = match(text, '^(%d+)%-(%d+)$')
  return tonumber(ms), tonumber(seq)
end

local floor_ms, floor_seq
for _, entry in ipairs(groups) do
  local group = fields(entry)
  local ms, seq
  if group['pending'] > 0 then
    ms, seq = id_of(redis.call('XPENDING', stream, group['name'])[2])
  else
    ms, seq = id_of(group['last-delivered-id'])
    seq = seq + 1
  end
  if not floor_ms or ms < floor_ms or (ms == floor_ms and seq < floor_seq) then
    floor_ms, floor_seq = ms, seq
  end
  for _, c in ipairs(redis.call('XINFO', 'CONSUMERS', stream, group['name'])) do
    local consumer = fields(c)
    if consumer['pending'] == 0 and consumer['idle'] > idle_ms then
      redis.call('XGROUP', 'DELCONSUMER', stream, group['name'], consumer['name'])
    end
  end
end
redis.call('XTRIM', stream, 'MINID', int(floor_ms) .. '-' .. int(floor_seq))
return redis.call('XLEN', stream)
