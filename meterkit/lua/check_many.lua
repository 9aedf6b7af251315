-- meterkit check of many requests in one EVALSHA (see check.lua): each request is
-- checked in turn, all or nothing on its own, as if each had its own EVALSHA; this
-- saves Redis a command and the client a reply per request.
--
-- KEYS  per request in turn: check.lua's keys, then its idempotency record if any
-- ARGV  1, 2 the month the caller expects (start, end µs; checked), then 7 per
--       request: its tier set (an index into T), 1 if it has an idempotency key
--       else 0, now µs ('' = server TIME, read once for the batch), cost
--       µ-credits, charge id ('' without an idempotency key: only its record keeps
--       it), key id, operation
--
-- Reply: one reply per request, check's (a packed string, or a replay's table); or an error of that request alone (a key
-- holding something meterkit did not write), which changed nothing.

local replies = {}
-- (the month, as numbers once for the whole batch; each check keeps its own copy)
local start, finish = tonumber(ARGV[1]), tonumber(ARGV[2])
local server_now, server_text
local k, b = 0, 3
for r = 1, (#ARGV - 2) / 7 do
  local set = T[tonumber(ARGV[b])]
  local n = set[1]
  local idem
  if ARGV[b + 1] == '1' then
    idem = KEYS[k + n + 3]
  end
  local now, now_text
  if ARGV[b + 2] == '' then
    if not server_now then
      server_now, server_text = clock_text('')
    end
    now, now_text = server_now, server_text
  else
    now, now_text = clock_text(ARGV[b + 2])
  end
  local ok, reply = pcall(check, n, set[2], set[3], k, now, now_text, ARGV[b + 3], ARGV[b + 4],
                          ARGV[b + 5], ARGV[b + 6], start, finish, idem)
  if not ok then
    -- (Redis hands a script's error to pcall as its text)
    reply = {err = type(reply) == 'table' and reply.err or tostring(reply)}
  end
  replies[r] = reply
  k = k + n + (idem and 3 or 2)
  b = b + 7
end
return replies
