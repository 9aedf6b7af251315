-- meterkit top-up: add credits to the organization's current month only.
--
-- KEYS[1] the organization's account  KEYS[2] its allowance override
-- ARGV    1 now µs ('' = server TIME)  2 amount µ-credits  3 TTL grace ms

local now = clock(ARGV[1])
local start, finish = month(now)
local account = KEYS[1]
local a = redis.call('HMGET', account, 'p', 't')
if a[1] and not tonumber(a[1]) then
  corrupt(account)
end
if a[1] and tonumber(a[1]) == start then
  local topup = tonumber(a[2] or 0)
  if not topup then
    corrupt(account)
  end
  redis.call('HSET', account, 't', int(topup + tonumber(ARGV[2])))
else
  -- A new month's account starts with a copy of the allowance override (see check.lua).
  local override = redis.call('GET', KEYS[2])
  redis.call('DEL', account)
  if override then
    redis.call('HSET', account, 'p', int(start), 't', ARGV[2], 'a', override)
  else
    redis.call('HSET', account, 'p', int(start), 't', ARGV[2])
  end
  redis.call('PEXPIRE', account, ttl(finish - now, tonumber(ARGV[3])))
end
return 1
