-- meterkit usage: the organization's account and allowance override, with the month.
--
-- KEYS[1] the organization's account  KEYS[2] its allowance override
-- ARGV    1 now µs ('' = server TIME)
-- Reply   {period start, period end, override or nil, {field, value, ...}}

local start, finish = month(clock(ARGV[1]))
return {start, finish, redis.call('GET', KEYS[2]), redis.call('HGETALL', KEYS[1])}
