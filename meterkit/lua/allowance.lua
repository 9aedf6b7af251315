-- meterkit allowance: set (or, with '', remove) the organization's allowance override.
--
-- KEYS[1] the override (STRING, kept without TTL: it is configuration)
-- KEYS[2] the organization's account, whose copy of the override is kept in step
-- ARGV    1 µ-credits, or '' to go back to the policy's allowance

if ARGV[1] == '' then
  redis.call('DEL', KEYS[1])
  redis.call('HDEL', KEYS[2], 'a')
else
  redis.call('SET', KEYS[1], ARGV[1])
  if redis.call('EXISTS', KEYS[2]) == 1 then
    redis.call('HSET', KEYS[2], 'a', ARGV[1])
  end
end
return 1
