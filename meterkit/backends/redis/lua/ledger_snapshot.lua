-- meterkit ledger snapshot: an organization's counters and its undrained events at
-- one instant, for reconciliation.
--
-- KEYS[1] the organization's account  KEYS[2] its ledger stream
-- ARGV    1 now µs ('' = server TIME)
-- Reply   {month start µs, month end µs, the account (HGETALL), the stream's last
--          entry id ('0-0' if none), {entry id, fields}... of the organization's
--          entries still in the stream}
--
-- In one step, so that the counters and the events agree: every event of the
-- organization until now is either in the stream (returned here) or was trimmed,
-- which happens only once a store holds it; an event a store holds whose position
-- is past the last id returned happened after this snapshot.

local start, finish = month(clock(ARGV[1]))
local stream = KEYS[2]
local last = '0-0'
local mine = {}
if redis.call('EXISTS', stream) == 1 then
  local info = redis.call('XINFO', 'STREAM', stream)
  for i = 1, #info, 2 do
    if info[i] == 'last-generated-id' then
      last = info[i + 1]
    end
  end
  -- (an entry's body is its id, then the account key, then the rest: see
  -- meterkit/ledger/events.py)
  local head = KEYS[1] .. '\n'
  local n = #head
  for _, entry in ipairs(redis.call('XRANGE', stream, '-', '+')) do
    local body = entry[2][2] or ''
    local cut = string.find(body, '\n', 1, true)
    if cut and string.sub(body, cut + 1, cut + n) == head then
      mine[#mine + 1] = entry
    end
  end
end
return {start, finish, redis.call('HGETALL', KEYS[1]), last, mine}
