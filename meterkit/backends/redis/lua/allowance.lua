-- meterkit allowance: set (or, with '', remove) the organization's allowance override.
--
-- KEYS[1] the override (STRING, kept without TTL: it is configuration)
-- KEYS[2] the organization's account, whose copy of the override is kept in step
-- KEYS[3] with a ledger, the ledger stream
-- ARGV    1 µ-credits, or '' to go back to the policy's allowance  2 the ledger event's
--         id ('' without a ledger)  3 now µs ('' = server TIME)

local head = redis.call('HGET', KEYS[2], 'h')
local period, used, topup
if head then
  period, used, topup = head_of(head, KEYS[2])
end
if ARGV[1] == '' then
  redis.call('DEL', KEYS[1])
else
  redis.call('SET', KEYS[1], ARGV[1])
end
if head then
  local override = ARGV[1] == '' and -1 or tonumber(ARGV[1])
  local totals = struct.pack(HEAD, period, used, topup, override)
  redis.call('HSET', KEYS[2], 'h', totals .. string.sub(head, 33))
end
if ARGV[2] ~= '' then
  local event = ARGV[2] .. '\n' .. KEYS[2] .. '\n' .. int(clock(ARGV[3])) .. '\n' .. ARGV[1]
  redis.call('XADD', KEYS[3], '*', 'a', event)
end
return 1
