-- meterkit top-up: add credits to the organization's current month only.
--
-- KEYS[1] the organization's account  KEYS[2] its allowance override  KEYS[3] its plans
--         KEYS[4] with a ledger, the ledger stream
-- ARGV    1 now µs ('' = server TIME)  2 amount µ-credits  3 TTL grace ms  4 the ledger
--         event's id ('' without a ledger)
-- Reply   1 added; 0 refused, nothing written (the month's top-ups would pass 2^53 - 1)

local now = clock(ARGV[1])
local start, finish = month(now)
local account = KEYS[1]
local amount = tonumber(ARGV[2])
local head = redis.call('HGET', account, 'h')
local period, used, topup, override
if head then
  period, used, topup, override = head_of(head, account)
end
if period == start then
  if topup + amount >= EXACT then
    return 0
  end
  local totals = struct.pack(HEAD, period, used, topup + amount, override)
  redis.call('HSET', account, 'h', totals .. string.sub(head, 33))
else
  -- A new month's account starts with a copy of the allowance override and of the
  -- plan record (see check.lua).
  override = allowance_of(KEYS[2]) or -1
  redis.call('DEL', account)
  local rec = redis.call('HGET', KEYS[3], 'o') or ''
  redis.call('HSET', account, 'h', struct.pack(HEAD, start, 0, amount, override) .. rec)
  redis.call('PEXPIRE', account, ttl(finish - now, tonumber(ARGV[3])))
end
if ARGV[4] ~= '' then
  redis.call('XADD', KEYS[4], '*', 't', ARGV[4] .. '\n' .. account .. '\n' .. int(now) .. '\n' .. ARGV[2])
end
return 1
