-- meterkit usage: the organization's account, allowance override and plan record, with
-- the month.
--
-- KEYS[1] the organization's account  KEYS[2] its allowance override  KEYS[3] its plans
-- ARGV    1 now µs ('' = server TIME)
-- Reply   {period start, period end, override or nil, {field, value, ...}, record or nil}

local start, finish = month(clock(ARGV[1]))
return {start, finish, redis.call('GET', KEYS[2]), redis.call('HGETALL', KEYS[1]),
        redis.call('HGET', KEYS[3], 'o')}
