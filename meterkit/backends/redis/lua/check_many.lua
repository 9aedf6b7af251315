-- meterkit check of many requests in one EVALSHA (see check.lua): each request is
-- checked in turn, all or nothing on its own, as if each had its own EVALSHA; this
-- saves Redis a command and the client a reply per request.
--
-- KEYS  per request in turn: check.lua's keys, then its idempotency record if any;
--       then, with a ledger, the ledger stream of them all (they share a hash slot)
-- ARGV  1, 2 the month the caller expects (start, end µs; checked), then 5 per
--       request: its tier set (an index into T; negative if the request has an
--       idempotency key; followed by ' ' and the key's plan when the request names
--       one), now µs ('' = server TIME, read once for the batch), cost
--       µ-credits, charge id ('' without an idempotency key or a ledger: only its
--       record and its event keep it), the account's field of its key and operation ('q|<op>|<key>')
--
-- Reply: one reply per request, check's (a packed string, or a replay's table); or an error of that request alone (a key
-- holding something meterkit did not write), which changed nothing.

local replies = {}
-- (the month, as numbers once for the whole batch; each check keeps its own copy)
local start, finish = tonumber(ARGV[1]), tonumber(ARGV[2])
local server_now, server_text
local k, b = 0, 3
for r = 1, (#ARGV - 2) / 5 do
  local index = tonumber(ARGV[b])
  local kp
  if not index then
    index, kp = match(ARGV[b], '^(%-?%d+) (.+)$')
    index = tonumber(index)
  end
  local idem
  if index < 0 then
    index = -index
    idem = true
  end
  local set = T[index]
  local n = set[1]
  if idem then
    idem = KEYS[k + n + 4]
  end
  local now, now_text
  if ARGV[b + 1] == '' then
    if not server_now then
      server_now, server_text = clock_text('')
    end
    now, now_text = server_now, server_text
  else
    now, now_text = clock_text(ARGV[b + 1])
  end
  local ok, reply = pcall(check, n, set[2], set[3], set[4], set[5], set[6], set[7], set[8],
                          k, now, now_text, ARGV[b + 2], ARGV[b + 3], ARGV[b + 4], start, finish,
                          idem, false, kp)
  if not ok then
    -- (Redis hands a script's error to pcall as its text)
    reply = {err = type(reply) == 'table' and reply.err or tostring(reply)}
  end
  replies[r] = reply
  k = k + n + (idem and 4 or 3)
  b = b + 5
end
return replies
