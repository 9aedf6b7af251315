-- meterkit refund: give an admitted request's credits back, once, within its month.
--
-- KEYS[1] the organization's account  KEYS[2] the idempotency record (optional)
--         then, with a ledger, the ledger stream (the last key)
-- ARGV    1 now µs ('' = server TIME)  2 period start µs of the charge  3 charge id
--         4 the amount µ-credits  5 the 'q|<op>|<key>' field of the charge
--         6 '1' with a ledger
-- Reply   1 refunded, 0 not (an ended month, refunded before, or more than this key and
--         operation were charged this month: a refund returns only what was recorded)

local now = clock(ARGV[1])
local start = month(now)
local ledger = ARGV[6] == '1' and KEYS[#KEYS]
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
if not a[2] then
  return 0  -- nothing was charged to this key and operation this month
end
local requests, spent = pair_of(a[2], account)
local amount = tonumber(ARGV[4])
if not amount or amount % 1 ~= 0 or amount < 0 or amount > spent or amount > used then
  return 0
end
if redis.call('HSETNX', account, 'x|' .. ARGV[3], 1) == 0 then
  return 0
end
local head = struct.pack(HEAD, period, used - amount, topup, override) .. string.sub(a[1], 33)
redis.call('HSET', account, 'h', head, ARGV[5], struct.pack(PAIR, requests, spent - amount))
if ledger then
  local event = ARGV[3] .. '\n' .. account .. '\n' .. int(now) .. '\n' .. ARGV[4] .. '\n' .. ARGV[5]
  redis.call('XADD', ledger, '*', 'r', event)
end
local idem = KEYS[2]
if idem and idem ~= ledger then
  -- A refunded request did not happen as far as billing goes: its retry is a new
  -- request. A newer request that reused the key keeps its record.
  local record = redis.call('GET', idem)
  if record and match(record, '^[^\n]*\n([^\n]*)\n') == ARGV[3] then
    redis.call('DEL', idem)
  end
end
return 1
