-- meterkit check: every rate tier, the credit debit and the idempotency record of one
-- request, all or nothing. The same math as meterkit/_memory.py, which is the
-- reference; tests/test_conformance.py holds the two together.
--
-- KEYS[1..n]  one state key per tier, in policy order
-- KEYS[n+1]   the organization's account (HASH: p period start, u used, t top-ups,
--             a the allowance override (a copy of KEYS[n+2], made when the account
--             starts and kept by set_allowance), 'r|<op>|<key>' requests and
--             'c|<op>|<key>' credits of each pair, 'x|<charge>' refunded charges)
-- KEYS[n+2]   the organization's allowance override (STRING, optional)
-- KEYS[n+3]   the idempotency record (STRING), only when the request has a key
--
-- ARGV  1 now µs ('' = server TIME)  2 cost µ-credits  3 charge id  4 key id
--       5 operation  6, 7 the month the caller expects (start, end µs; checked)
--       8 TTL grace ms  9 policy allowance  10 policy shadow (0/1)
--       11 n, then per tier its algorithm (+10 when soft: a shadow tier never denies)
--       and parameters: fixed and sliding window: limit, window µs; gcra: emission
--       interval µs, tau µs; sliding log: limit, window µs, TTL ms of the log.
--
-- Reply: {allowed 0/1, reason, now, retry, charged, balance, period end,
--         remaining, reset, denied, ...per tier} — remaining as if admitted
--         (the caller adds back what a denied request did not take);
--         or {-1, record} to replay the first decision of an idempotency key.
--
-- Hot path: numbers are turned into strings as rarely as possible (that costs more
-- than a command here); counters go up with HINCRBY, and times already written as
-- text (ARGV, TIME) are stored as they came.

local call = redis.call
local now, now_text
if ARGV[1] == '' then
  -- Redis 5+ replicates a script's effects, not the script, so TIME may precede writes.
  local t = call('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
  now_text = t[1] .. rep('0', 6 - #t[2]) .. t[2]
else
  now_text = ARGV[1]
  now = tonumber(now_text)
end
local grace = tonumber(ARGV[8])
local n = tonumber(ARGV[11])
local IDEM_US = 86400000000

local idem = KEYS[n + 3]
if idem then
  local record = call('GET', idem)
  if record then
    local expires = tonumber(match(record, '^%d+'))
    if not expires then
      corrupt(idem)
    end
    if expires > now then
      return {-1, record}
    end
  end
end

-- Look at every tier first; write nothing until all of them and the credits agree.
-- What each admitting tier will write: plan[i] = 1 increment the window's counter,
-- 2 start a new window (fixed), 3 start a new window (sliding), 4 set the TAT,
-- 5 append to the log; new[i] the value that comes with it.
local results = {}
local plan, new, extra = {}, {}, {}
local retry = 0
local denied = false
local a = 12
for i = 1, n do
  local code = tonumber(ARGV[a])
  local soft = code >= 10
  if soft then
    code = code - 10
  end
  local key = KEYS[i]
  local ok, wait, remaining, reset
  if code == 0 or code == 1 then
    -- fixed window (UTC-aligned) and sliding window (weighted two-counter):
    -- a HASH of w (window id), c (count in it) and, sliding, p (count in the one before)
    local limit, w = tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
    a = a + 3
    local wid = idiv(now, w)
    local cur, prev = 0, 0
    local v = code == 0 and call('HMGET', key, 'w', 'c') or call('HMGET', key, 'w', 'c', 'p')
    local sw = v[1]
    if sw then
      sw = tonumber(sw)
      local sc = tonumber(v[2])
      if not (sw and sc) then
        corrupt(key)
      end
      if sw == wid then
        cur = sc
        if code == 1 then
          prev = tonumber(v[3] or 0)
          if not prev then
            corrupt(key)
          end
        end
      elseif sw == wid - 1 and code == 1 then
        prev = sc
      end
    end
    local start = wid * w
    reset = start + w - now
    if code == 0 then
      if cur < limit then
        ok, remaining = true, limit - cur - 1
      else
        ok, wait = false, reset
      end
    else
      local used = prev * (w - (now - start)) + (cur + 1) * w
      if used <= limit * w then
        ok, remaining = true, idiv(limit * w - used, w)
      elseif cur + 1 <= limit then
        ok, wait = false, start + w - idiv((limit - 1 - cur) * w, prev) - now
      else
        ok, wait = false, start + w + w - idiv((limit - 1) * w, cur) - now
      end
    end
    if ok then
      if sw == wid then
        plan[i] = 1
      else
        -- a new window: its TTL ends with it (sliding: with the next, where it is "prev")
        plan[i], new[i] = 2 + code, wid
        extra[i] = code == 0 and reset or reset + w
        extra[-i] = prev
      end
    end
  elseif code == 2 then
    -- gcra: the theoretical arrival time (STRING)
    local interval, tau = tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
    a = a + 3
    local tat = now
    local v = call('GET', key)
    if v then
      local t = tonumber(v)
      if not t then
        corrupt(key)
      end
      if t > now then
        tat = t
      end
    end
    local ahead = tat + interval - now
    if ahead <= tau then
      ok, remaining, reset = true, idiv(tau - ahead, interval), ahead
      plan[i], new[i], extra[i] = 4, tat + interval, ahead
    else
      ok, wait, reset = false, ahead - tau, tat - now
    end
  else
    -- sliding log: a LIST of admission times, oldest first (equal times count twice)
    local limit, w = tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
    local life = ARGV[a + 3]
    a = a + 4
    local len = call('LLEN', key)
    local oldest = now
    if len > 0 then
      local cutoff = now - w
      oldest = tonumber(call('LINDEX', key, 0))
      if not oldest then
        corrupt(key)
      end
      while oldest <= cutoff do
        call('LPOP', key)
        len = len - 1
        if len == 0 then
          oldest = now
          break
        end
        oldest = tonumber(call('LINDEX', key, 0))
        if not oldest then
          corrupt(key)
        end
      end
    end
    if len < limit then
      ok, remaining, reset = true, limit - len - 1, oldest + w - now
      plan[i], new[i] = 5, life
    else
      local edge = tonumber(call('LINDEX', key, len - limit))
      if not edge then
        corrupt(key)
      end
      wait = edge + w - now
      ok, reset = false, wait
    end
  end
  local r = (i - 1) * 3
  if ok then
    results[r + 1], results[r + 2], results[r + 3] = remaining, reset, 0
  else
    results[r + 1], results[r + 2], results[r + 3] = 0, reset, 1
    plan[i] = false
    if not soft then
      denied = true
      if wait > retry then
        retry = wait
      end
    end
  end
end

-- Credits: one account per organization and calendar month.
local account = KEYS[n + 1]
local start, finish = tonumber(ARGV[6]), tonumber(ARGV[7])
if not (start <= now and now < finish) then
  start, finish = month(now)
end
local cost = tonumber(ARGV[2])
local pair = ARGV[5] .. '|' .. ARGV[4]
local v = call('HMGET', account, 'p', 'u', 't', 'a', 'r|' .. pair, 'c|' .. pair)
local used, topup = 0, 0
local current, stale = false, false
local override = false
if v[1] then
  local period = tonumber(v[1])
  if not period then
    corrupt(account)
  end
  if period == start then
    current = true
    used, topup = tonumber(v[2] or 0), tonumber(v[3] or 0)
    if not (used and topup and tonumber(v[5] or 0) and tonumber(v[6] or 0)) then
      corrupt(account)
    end
    override = v[4]
  else
    stale = true
  end
end
if not current then
  override = call('GET', KEYS[n + 2])
end
local allowance = tonumber(ARGV[9])
if override then
  allowance = tonumber(override)
  if not allowance then
    corrupt(current and account or KEYS[n + 2])
  end
end
local balance = allowance + topup - used

local broke = cost > balance and ARGV[10] == '0'
if broke or denied then
  if stale then
    -- A new month began: last month's account (and its refunds) ends here, as in memory.
    call('DEL', account)
  end
  if broke then
    local wait = finish - now
    if retry > wait then
      wait = retry
    end
    return {0, 2, now, wait, 0, balance, finish, unpack(results)}
  end
  return {0, 1, now, retry, 0, balance, finish, unpack(results)}
end

-- Admitted: consume every tier, debit the credits, remember the decision.
for i = 1, n do
  local step = plan[i]
  if step then
    local key = KEYS[i]
    if step == 1 then
      call('HINCRBY', key, 'c', 1)
    elseif step == 2 then
      call('HSET', key, 'w', new[i], 'c', 1)
      call('PEXPIRE', key, ttl(extra[i], grace))
    elseif step == 3 then
      call('HSET', key, 'w', new[i], 'c', 1, 'p', extra[-i])
      call('PEXPIRE', key, ttl(extra[i], grace))
    elseif step == 4 then
      call('SET', key, int(new[i]), 'PX', ttl(extra[i], grace))
    else
      call('RPUSH', key, now_text)
      call('PEXPIRE', key, new[i])
    end
  end
end
if current then
  call('HINCRBY', account, 'u', ARGV[2])
else
  if stale then
    call('DEL', account)
  end
  if override then
    call('HSET', account, 'p', int(start), 'u', ARGV[2], 'a', override)
  else
    call('HSET', account, 'p', int(start), 'u', ARGV[2])
  end
  call('PEXPIRE', account, ttl(finish - now, grace))
end
call('HINCRBY', account, 'r|' .. pair, 1)
call('HINCRBY', account, 'c|' .. pair, ARGV[2])
if idem then
  local parts = {int(now + IDEM_US), now_text, ARGV[2], int(balance - cost), int(finish)}
  for j = 1, n * 3 do
    parts[j + 5] = int(results[j])
  end
  local record = concat(parts, ' ') .. '\n' .. ARGV[3] .. '\n' .. ARGV[5] .. '\n' .. ARGV[4]
  call('SET', idem, record, 'PX', ttl(IDEM_US, grace))
end
return {1, 0, now, 0, cost, balance - cost, finish, unpack(results)}
