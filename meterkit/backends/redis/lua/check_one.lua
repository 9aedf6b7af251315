-- meterkit check, one request per EVALSHA: check.lua's body runs inline, after these
-- lines, instead of as a function (meterkit/backends/redis/backend.py puts it here when it loads the
-- script), which saves Redis making the function and calling it on every check.
--
-- KEYS  check.lua's, from KEYS[1]; then the idempotency record, if the request has one;
--       then, with a ledger, the ledger stream
-- ARGV  1 now µs ('' = server TIME)  2 cost µ-credits  3 charge id ('' without an
--       idempotency key: only its record keeps it)  4 the account's field of the key
--       and operation ('q|<op>|<key>')  5, 6 the month the caller expects (start, end
--       µs; checked)  7 the key's plan as the request names it ('' or absent: none)
--       8 '1' for a peek (decide, write nothing), absent for a check

local k = 0
local now, now_text = clock_text(ARGV[1])
local cost_text, charge, field = ARGV[2], ARGV[3], ARGV[4]
local idem = KEYS[n + 4]
if ledger and #KEYS == n + 4 then
  idem = nil  -- (that last key is the ledger stream)
end
local start, finish = tonumber(ARGV[5]), tonumber(ARGV[6])
local kp = ARGV[7]
if kp == '' then
  kp = nil
end
local dry = ARGV[8] == '1'
