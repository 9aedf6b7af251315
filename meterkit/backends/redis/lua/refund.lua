-- meterkit refund: give an admitted request's credits back, once, within its month.
--
-- KEYS[1] the organization's account  KEYS[2] the idempotency record (optional)
-- ARGV    1 now µs ('' = server TIME)  2 period start µs of the charge  3 charge id
--         4 the amount µ-credits  5 the 'q|<op>|<key>' field of the charge
-- Reply   1 refunded, 0 not (an ended month, or refunded before)

local start = month(clock(ARGV[1]))
local account = KEYS[1]
if start ~= tonumber(ARGV[2]) then
  return 0  -- an ended month is closed, even if the organization was idle since
end
local a = redis.call('HMGET', account, 'h', ARGV[5])
if not a[1] then
  return 0
end
local period, used, topup, override = head_of(a[1], account)
if period ~= start then
  return 0
end
local requests, spent
if a[2] then
  requests, spent = pair_of(a[2], account)
end
if redis.call('HSETNX', account, 'x|' .. ARGV[3], 1) == 0 then
  return 0
end
local amount = tonumber(ARGV[4])
local head = struct.pack(HEAD, period, used - amount, topup, override)
if requests then
  redis.call('HSET', account, 'h', head, ARGV[5], struct.pack(PAIR, requests, spent - amount))
else
  redis.call('HSET', account, 'h', head)
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
