-- meterkit refund: give an admitted request's credits back, once, within its month.
--
-- KEYS[1] the organization's account  KEYS[2] the idempotency record (optional)
-- ARGV    1 now µs ('' = server TIME)  2 period start µs of the charge  3 charge id
--         4 minus the amount µ-credits  5 the 'c|<op>|<key>' field of the charge
-- Reply   1 refunded, 0 not (an ended month, or refunded before)

local start = month(clock(ARGV[1]))
local account = KEYS[1]
if start ~= tonumber(ARGV[2]) then
  return 0  -- an ended month is closed, even if the organization was idle since
end
local a = redis.call('HMGET', account, 'p', 'u', ARGV[5])
if not a[1] or tonumber(a[1]) ~= start then
  return 0
end
local used = tonumber(a[2] or 0)
if not used or (a[3] and not tonumber(a[3])) then
  corrupt(account)
end
if redis.call('HSETNX', account, 'x|' .. ARGV[3], 1) == 0 then
  return 0
end
redis.call('HINCRBY', account, 'u', ARGV[4])
if a[3] then
  redis.call('HINCRBY', account, ARGV[5], ARGV[4])
end
local idem = KEYS[2]
if idem then
  -- A refunded request did not happen as far as billing goes: its retry is a new
  -- request. A newer request that reused the key keeps its record.
  local record = redis.call('GET', idem)
  if record and match(record, '^[^\n]*\n([^\n]*)\n') == ARGV[3] then
    redis.call('DEL', idem)
  end
end
return 1
