-- meterkit assign: put the organization (or one of its keys) on a plan, give it a deal,
-- or take either away. Configuration: kept without TTL, like the allowance override.
--
-- KEYS[1] the organization's plans (HASH): 'o' its plan record, 'k|<key>' each key's plan
-- KEYS[2] the organization's account, whose copy of the record (after the totals in
--         'h') is kept in step
-- KEYS[3] with a ledger, the ledger stream
-- ARGV    1 what: 'plan' (the organization's), 'key' (a key's) or 'deal'
--         2 the plan's name, or the deal's lines ('<tier> <algorithm> <window µs>
--           <limit> <burst>', one per tier); '' takes it away
--         3 the key id (for 'key'; '' otherwise)
--         4 the ledger event's id ('' without a ledger)  5 now µs ('' = server TIME)
-- Reply   the organization's plan record after the change, or '' for none
--
-- The record is '<1 if any key has a plan, else 0><plan>', then '\n' and the deal's
-- lines if it has one. A check reads the account's copy in the HMGET it makes anyway
-- (so a check under the default plan costs nothing more), and the record itself only
-- before the month's account exists; it asks for its key's plan only when the first
-- character says some key has one.

local plans, account = KEYS[1], KEYS[2]
local what, value = ARGV[1], ARGV[2]
local rec = redis.call('HGET', plans, 'o') or '0'
local plan, deal = string.sub(rec, 2), ''
local cut = string.find(plan, '\n', 1, true)
if cut then
  plan, deal = string.sub(plan, 1, cut - 1), string.sub(plan, cut)
end
if what == 'plan' then
  plan = value
elseif what == 'deal' then
  deal = value == '' and '' or '\n' .. value
else
  local field = 'k|' .. ARGV[3]
  if value == '' then
    redis.call('HDEL', plans, field)
  else
    redis.call('HSET', plans, field, value)
  end
end
local keyed = redis.call('HLEN', plans) - redis.call('HEXISTS', plans, 'o')
rec = (keyed > 0 and '1' or '0') .. plan .. deal
if rec == '0' then
  redis.call('HDEL', plans, 'o')
  rec = ''
else
  redis.call('HSET', plans, 'o', rec)
end
-- The account's copy follows its totals (see common.lua).
local head = redis.call('HGET', account, 'h')
if head then
  head_of(head, account)
  redis.call('HSET', account, 'h', string.sub(head, 1, 32) .. rec)
end
if ARGV[4] ~= '' then
  local event = ARGV[4] .. '\n' .. account .. '\n' .. int(clock(ARGV[5])) .. '\n' .. what
  redis.call('XADD', KEYS[3], '*', 'p', event .. '\n' .. ARGV[3] .. '\n' .. value)
end
return rec
