-- meterkit response: the HTTP gate's record of an idempotency key's response, claimed by
-- a retry or kept when a run ends. The same rule as meterkit/core/idempotency.py, which
-- is the reference; tests/backends/test_conformance.py holds the two together.
--
-- KEYS[1] the record (STRING): '<kind>\n<charge>\n<fingerprint>\n<token>\n<until µs>\n'
--         then a 'D' record's payload; kind 'D' (a kept response), 'F' (free: a run
--         ended with nothing kept), 'L' (a retry holds the mark until <until>)
-- ARGV    1 'claim' or 'keep'  2 now µs ('' = server TIME)  3 the charge id
--         4 the charge's first decision, µs  5 the fingerprint  6 the token of this run
--         ('' for the first attempt)  7 TTL grace ms
--         claim: 8 the lock time µs
--         keep: 8 '1' to keep the payload, '0' for nothing  9 the payload
-- Reply   claim: {0} run, {1, µs} wait, {2} a different request, {3, payload} answer
--         with the kept response; keep: 1 written, 0 left as it was

local IDEM_US = 86400000000
local find, sub = string.find, string.sub
local record = KEYS[1]
local now = clock(ARGV[2])
local charge, first, fingerprint, token = ARGV[3], tonumber(ARGV[4]), ARGV[5], ARGV[6]
local grace = tonumber(ARGV[7])
local expires = first + IDEM_US

local held = redis.call('GET', record)
local kind, owner, till, head
if held then
  local found, last, k, c, f, o, t = find(held, '^([DFL])\n([^\n]*)\n([^\n]*)\n([^\n]*)\n(%d+)\n')
  if not found then
    corrupt(record)
  end
  -- Another charge's record is as good as none; so is one past its charge's 24 hours
  -- (its TTL counts the server's time, which a client clock need not follow).
  if c == charge and expires > now then
    kind, owner, till, head = k, o, tonumber(t), last
    if f ~= fingerprint then
      kind = kind .. '!'
    end
  end
end

if ARGV[1] == 'claim' then
  local lock = tonumber(ARGV[8])
  if kind then
    if sub(kind, 2) == '!' then
      return {2}
    elseif kind == 'D' then
      return {3, sub(held, head + 1)}
    elseif kind == 'L' and till > now then
      return {1, till - now}
    end
  elseif first + lock > now then
    -- The first attempt's own mark: its charge's record, younger than the lock time.
    return {1, first + lock - now}
  end
  if expires <= now then  -- (the charge's own record is gone: nothing to hold)
    return {0}
  end
  redis.call('SET', record, concat({'L', charge, fingerprint, token, int(now + lock), ''}, '\n'),
             'PX', ttl(expires - now, grace))
  return {0}
end

if expires <= now then
  return 0
end
local base = sub(kind or '', 1, 1)
if base == 'D' or (base == 'L' and owner ~= token and till > now) then
  return 0
end
local text
if ARGV[8] == '1' then
  text = concat({'D', charge, fingerprint, '', '0', ARGV[9]}, '\n')
else
  text = concat({'F', charge, fingerprint, '', '0', ''}, '\n')
end
redis.call('SET', record, text, 'PX', ttl(expires - now, grace))
return 1
