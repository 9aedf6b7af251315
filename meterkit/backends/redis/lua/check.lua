-- meterkit check: every rate tier, the credit debit and the idempotency record of one
-- request, all or nothing. The same math as meterkit/backends/memory/backend.py, which is the
-- reference; tests/test_conformance.py holds the two together.
--
-- This file defines check(); check_many.lua, after it, calls it once per request of
-- a batch; check_one.lua runs its body inline instead (meterkit/backends/redis/backend.py puts the
-- body after check_one.lua's lines, which bind its parameters; so the function's
-- signature stays on its first two lines, and its end is this file's last line). What is fixed for an
-- operation comes as code, not arguments: meterkit/backends/redis/backend.py puts lines before this
-- file (one script per distinct text, loaded by SHA),
--
--   local grace, allowance, shadow, A = <TTL grace ms>, <policy allowance>, <true/false>,
--                                       <credit alert thresholds: {<percent>...} or false>
--   local ledger = KEYS[#KEYS] (the ledger stream, the last key) or false
--   local n, P, R, I, V, S, M, F = <tier count>, {<per tier: algorithm, a, b, c>...},
--                                  <reply format>, <plans>...            (check_one)
--   local T = {{<tier count>, {<per tier: ...>}, <reply format>, <plans>...}, ...}
--                                                    (check_many: every tier set)
--
-- where a tier's algorithm is +10 when soft (a shadow tier never denies) and a, b, c
-- are: fixed and sliding window: limit, window µs, 0; gcra: emission interval µs,
-- tau µs, 0; sliding log: limit, window µs, TTL ms of the log (as text).
-- That saves Redis turning a dozen arguments into numbers on every check.
-- P is the default plan's. The customer plans are strings, so that a check under the
-- default plan makes nothing of them: V holds each plan's P (a tier it turns off has
-- +20) and allowance as 8-byte little-endian integers, I says where ('\n<plan>
-- <offset in V>', a line per plan); S has a '1' for each key-scoped tier, '0' for each
-- other; M a line per tier, '<tier> <window µs>'; F the format of a plan's numbers in V.
-- A plan I does not name (the default plan, or one the policy no longer has) has the
-- numbers of P.
--
-- check(n, P, R, I, V, S, M, F, k, now, now_text, cost, charge, field, start, finish,
-- idem, dry, kp) finds its keys at KEYS[k + 1...]:
--
-- KEYS[k+1..k+n]  one state key per tier, in policy order: the same key under every
--                 plan (a customer who changes plan keeps what it spent)
-- KEYS[k+n+1]     the organization's account (HASH: 'h' the month's totals, 'q|<op>|<key>'
--                 each pair's requests and credits, 'x|<charge>' refunds, 'a' how many
--                 credit alert thresholds the month reached; after 'h''s totals, a copy
--                 of the organization's plan record, if it has one; see common.lua's
--                 head_of and pair_of)
-- KEYS[k+n+2]     the organization's allowance override (STRING, optional)
-- KEYS[k+n+3]     the organization's plans (HASH, optional: 'o' its plan record,
--                 'k|<key>' each key's plan; see assign.lua)
-- idem            the idempotency record's key (STRING), or nil
-- dry             true for a peek: decide as a check would, write nothing
-- kp              the key's plan as the request names it (from a key store), or nil
-- ledger          (the script's head) the ledger stream, the call's last key, or false:
--                 an admitted check appends its event there (XADD)
--
-- and takes as text (as it came in ARGV): the cost in µ-credits, the charge id ('' when
-- there is no idempotency record or ledger event to keep it), and the account's field of the request's
-- key and operation ('q|<op>|<key>'); and the month the caller expects (start and
-- finish µs, checked) as numbers (a batch parses them once).
--
-- Reply: allowed 0/1, reason, now, retry, charged, balance, period end, then per
--        tier remaining, reset, denied — remaining as if admitted (the caller adds
--        back what a denied request did not take; a tier off under the plan in force
--        says 0, 0, 0) — packed in one string as 8-byte little-endian integers (R:
--        '<' and 'i8' once per number), which saves Redis a reply element per number;
--        when the request reached credit alert thresholds first, followed by '!', how
--        many the month had reached before, ' ' and how many now; under a customer
--        plan, followed by '\n', the key's plan and '\n', the organization's plan
--        record without its first character (the plans in force);
--        or {-1, record} to replay the first decision of an idempotency key.
--
-- Hot path (each of these costs Redis more than a line of Lua): as few commands as
-- the state allows (one read and one write per key), no number parsed or printed
-- twice, text that came as text (ARGV, TIME) stored as it came, and constant
-- arguments to redis.call written as strings (a Lua number is printed with %.17g).

local call = redis.call
local spread = unpack
local pack, unpack, sub = struct.pack, struct.unpack, string.sub
local byte, find, gmatch = string.byte, string.find, string.gmatch
local IDEM_US = 86400000000
-- A sliding log entry, and each number of a window, is an 8-byte little-endian
-- integer, exact below 2^53.
local ENTRY_MAX = EXACT

-- The time of a check from its text: the client's clock, or '' for the server's
-- TIME (Redis 5+ replicates a script's effects, not the script, so TIME may precede
-- writes). Returns the time and its text.
local function clock_text(text)
  if text == '' then
    local t = call('TIME')
    text = t[1] .. rep('0', 6 - #t[2]) .. t[2]
  end
  return tonumber(text), text
end

-- The log entry at 0-based position i of a sliding log.
local function entry(log, i, key)
  local t = unpack('<i8', log, i * 8 + 1)
  if not (t < ENTRY_MAX and t > -ENTRY_MAX) then
    corrupt(key)
  end
  return t
end

local function check(n, P, R, I, V, S, M, F, k, now, now_text, cost_text, charge, field,
                     start, finish, idem, dry, kp)
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

  -- The organization's account: this month's totals (with the copy of its plan record
  -- after them, if it has one) and this key's and operation's (one HMGET).
  local account = KEYS[k + n + 1]
  if not (start <= now and now < finish) then
    start, finish = month(now)
  end
  local v = A and call('HMGET', account, 'h', field, 'a') or call('HMGET', account, 'h', field)
  local used, topup, requests, spent = 0, 0, 0, 0
  local current, stale = false, false
  local override = false
  local head = v[1]
  local rec = false
  if head then
    local period, u, t, a = head_of(head, account)
    if period == start then
      current = true
      used, topup = u, t
      if a >= 0 then
        override = a
      end
      if #head > 32 then
        rec = sub(head, 33)
      end
      if v[2] then
        requests, spent = pair_of(v[2], account)
      end
    else
      stale = true
    end
  end
  -- The plans in force: none (the default plan: P as it came) unless the organization
  -- has a plan record, or the request names its key's plan.
  local plans = KEYS[k + n + 3]
  if not current then
    -- (no account this month yet: the record itself, which the account will copy)
    rec = call('HGET', plans, 'o')
  end
  if rec and not kp and byte(rec) == 49 then
    -- ('1': some key of the organization has a plan; is it this one?)
    kp = call('HGET', plans, 'k|' .. sub(field, find(field, '|', 3, true) + 1))
  end
  local plan_allowance = allowance
  local named  -- (what the reply adds under a customer plan: the plans in force)
  local ttls = P  -- (a sliding log's TTL, as text: the same under every plan)
  if rec or kp then
    -- The tiers' numbers and the allowance under the plans in force, by the rule of
    -- meterkit.core.policy.Policy.limits_for: key-scoped tiers follow the key's plan if
    -- it has one, the rest (and the allowance) the organization's; a deal changes a
    -- tier while it has the algorithm and window it was made for. The record after
    -- its first character is '<plan>', then a line per tier of the deal: '<tier>
    -- <algorithm> <window µs> <limit, 0: off> <burst>' (see assign.lua).
    named = rec and sub(rec, 2) or ''
    local plan, deal = named, nil
    local cut = find(named, '\n', 1, true)
    if cut then
      plan, deal = sub(named, 1, cut - 1), sub(named, cut + 1)
    end
    local params = P
    local at = plan ~= '' and find(I, '\n' .. plan .. ' ', 1, true)
    if at then
      params = {unpack(F, V, tonumber(match(I, '^%d+', at + #plan + 2)))}
      plan_allowance = params[4 * n + 1]
    end
    if kp then
      local keyed = P
      at = find(I, '\n' .. kp .. ' ', 1, true)
      if at then
        keyed = {unpack(F, V, tonumber(match(I, '^%d+', at + #kp + 2)))}
      end
      if keyed ~= params then
        local merged = {}
        for i = 1, n do
          local from = byte(S, i) == 49 and keyed or params  -- ('1': key-scoped)
          local a = i * 4 - 3
          merged[a], merged[a + 1], merged[a + 2], merged[a + 3] =
            from[a], from[a + 1], from[a + 2], from[a + 3]
        end
        params = merged
      end
    end
    if deal then
      if params == P then  -- (P is the script's: change a copy)
        params = {spread(P)}
      end
      -- M: a line per tier, '<tier> <window µs>'
      local positions, windows, i = {}, {}, 0
      for name, w in gmatch(M, '([^ \n]+) (%d+)') do
        i = i + 1
        positions[name], windows[i] = i, tonumber(w)
      end
      for name, code, w, limit, burst in gmatch(deal, '([^ \n]+) (%d+) (%d+) (%d+) (%d+)') do
        i = positions[name]
        local a = i and i * 4 - 3
        if i and P[a] % 10 == tonumber(code) and windows[i] == tonumber(w) then
          limit = tonumber(limit)
          if limit == 0 then
            params[a] = P[a] + 20
          else
            params[a] = P[a]
            if code == '2' then
              local interval = idiv(windows[i] + limit - 1, limit)
              params[a + 1], params[a + 2] = interval, tonumber(burst) * interval
            else
              params[a + 1] = limit
            end
          end
        end
      end
    end
    P = params
  end

  -- Look at every tier first; write nothing until all of them and the credits agree.
  -- What each admitting tier will write: plan[i] = 1 increment the window's counter,
  -- 2 start a new window (fixed), 3 start a new window (sliding), 4 set the TAT,
  -- 5 append to the log; new[i] the value that comes with it.
  -- The reply, built in place: its head (7 slots) is filled in once the outcome is known.
  local results = {0, 0, 0, 0, 0, 0, 0}
  local plan, new, extra = {}, {}, {}
  local retry = 0
  local denied = false
  local a = 1
  for i = 1, n do
    local code = P[a]
    if code >= 20 then
      -- off under the plan in force: not looked at, not counted
      local r = i * 3 + 4
      results[r + 1], results[r + 2], results[r + 3] = 0, 0, 0
      a = a + 4
    else
      local soft = code >= 10
      if soft then
        code = code - 10
      end
      local key = KEYS[k + i]
      local ok, wait, remaining, reset
      if code == 0 or code == 1 then
        -- fixed window (UTC-aligned) and sliding window (weighted two-counter): a STRING
        -- of 8-byte little-endian integers: the window id, the count in it and, sliding,
        -- the count in the window before (one GET, one SET or SETRANGE when admitted)
        local limit, w = P[a + 1], P[a + 2]
        local wid = idiv(now, w)
        local cur, prev = 0, 0
        local v = call('GET', key)
        local sw
        if v then
          if #v ~= 16 + code * 8 then
            corrupt(key)
          end
          local sc, sp
          sw, sc, sp = unpack(code == 0 and '<i8i8' or '<i8i8i8', v)
          -- (counts are written as computed here: integers from 0, exact as doubles)
          if not (sw < ENTRY_MAX and sw > -ENTRY_MAX and sc >= 0 and sc < ENTRY_MAX)
            or code == 1 and not (sp >= 0 and sp < ENTRY_MAX) then
            corrupt(key)
          end
          if sw == wid then
            cur = sc
            if code == 1 then
              prev = sp
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
            plan[i], new[i] = 1, cur + 1
          else
            -- a new window: its TTL ends with it (sliding: with the next, where it is "prev")
            plan[i], new[i] = 2 + code, wid
            extra[i] = code == 0 and reset or reset + w
            extra[-i] = prev
          end
        end
      elseif code == 2 then
        -- gcra: the theoretical arrival time (STRING)
        local interval, tau = P[a + 1], P[a + 2]
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
        -- sliding log: a STRING of admission times, 8 bytes each, oldest first (equal
        -- times count twice); one GET, and one SET when admitted, whatever its length.
        local limit, w = P[a + 1], P[a + 2]
        local log = call('GET', key)
        local len, oldest, drop = 0, now, 0
        if log then
          len = #log / 8
          if len % 1 ~= 0 then
            corrupt(key)
          end
          -- entries at or before the cutoff have left the window: skip them here and
          -- cut them off once, when the request is admitted (nothing is written before)
          local cutoff = now - w
          while drop < len do
            oldest = entry(log, drop, key)
            if oldest > cutoff then
              break
            end
            drop = drop + 1
          end
          if drop == len then
            oldest = now
          end
          len = len - drop
        end
        if len < limit then
          ok, remaining, reset = true, limit - len - 1, oldest + w - now
          plan[i], new[i], extra[i] = 5, log, drop
        else
          wait = entry(log, drop + len - limit, key) + w - now
          ok, reset = false, wait
        end
      end
      a = a + 4
      local r = i * 3 + 4
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
  end

  -- Credits: one account per organization and calendar month (read above).
  local cost = tonumber(cost_text)
  if not current then
    override = allowance_of(KEYS[k + n + 2])
  end
  local allowed_micro = override or plan_allowance
  local balance = allowed_micro + topup - used

  local broke = cost > balance and not shadow

  -- Credit alerts: the thresholds of A (percents of the month's credits, increasing)
  -- that this request reaches first this month, by meterkit.core.credits.alerts_reached's
  -- rule (its charge takes usage to p% of the allowance and top-ups; a request refused
  -- for credits reaches them all). 'a' of the account counts those reached already: in
  -- this one atomic step, exactly one request of the month reaches each.
  local alerted, reached = 0, 0
  if A and not dry and (broke or not denied) then
    if current and v[3] then
      alerted = tonumber(v[3])
      if not alerted then
        corrupt(account)
      end
    end
    local demand, total = used + cost, allowed_micro + topup
    -- (p% of total is q * p + ceil(r * p / 100): no product past 2^53)
    local q, r = idiv(total, 100), total % 100
    while demand > 0 and reached < #A do
      local p = A[reached + 1]
      if demand < q * p + idiv(r * p + 99, 100) then
        break
      end
      reached = reached + 1
    end
  end
  -- What follows the reply's numbers: the alerts reached first, the plans in force.
  local tail = reached > alerted and ('!' .. alerted .. ' ' .. reached) or ''
  if named then
    tail = tail .. '\n' .. (kp or '') .. '\n' .. named
  end

  if broke or denied then
    if stale and not dry then
      -- A new month began: last month's account (and its refunds) ends here, as in memory.
      call('DEL', account)
    end
    if broke then
      if reached > alerted then
        if current then
          call('HSET', account, 'a', reached)
        else
          -- (the month's account, as an admission would start it, so that 'a' lasts)
          call('HSET', account, 'h', pack(HEAD, start, 0, 0, override or -1) .. (rec or ''),
               'a', reached)
          call('PEXPIRE', account, ttl(finish - now, grace))
        end
      end
      local wait = finish - now
      if retry > wait then
        wait = retry
      end
      results[1], results[2], results[3], results[4] = 0, 2, now, wait
      results[6], results[7] = balance, finish
      return pack(R, spread(results)) .. tail
    end
    results[1], results[2], results[3], results[4] = 0, 1, now, retry
    results[6], results[7] = balance, finish
    return pack(R, spread(results)) .. tail
  end

  if dry then
    -- A peek: the decision a check would get now, and nothing written.
    results[1], results[3], results[5] = 1, now, cost
    results[6], results[7] = balance - cost, finish
    return pack(R, spread(results)) .. tail
  end

  -- Admitted: consume every tier, debit the credits, remember the decision.
  for i = 1, n do
    local step = plan[i]
    if step then
      local key = KEYS[k + i]
      if step == 1 then
        -- the count, in place (the window and its TTL stay)
        call('SETRANGE', key, '8', pack('<i8', new[i]))
      elseif step == 2 then
        call('SET', key, pack('<i8i8', new[i], 1), 'PX', ttl(extra[i], grace))
      elseif step == 3 then
        call('SET', key, pack('<i8i8i8', new[i], 1, extra[-i]), 'PX', ttl(extra[i], grace))
      elseif step == 4 then
        call('SET', key, int(new[i]), 'PX', ttl(extra[i], grace))
      else
        -- the log lives until its newest entry (this one) leaves the window
        local log, drop = new[i], extra[i]
        local entry_now = pack('<i8', now)
        if not log then
          log = entry_now
        elseif drop == 0 then
          log = log .. entry_now
        else
          log = sub(log, drop * 8 + 1) .. entry_now
        end
        call('SET', key, log, 'PX', ttls[i * 4])
      end
    end
  end
  -- One write for the account: the totals were read above, and nothing ran since;
  -- the plan record's copy goes after them (see assign.lua).
  local totals = pack(HEAD, start, used + cost, topup, override or -1)
  if rec then
    totals = totals .. rec
  end
  if current then
    call('HSET', account, 'h', totals, field, pack(PAIR, requests + 1, spent + cost))
  else
    if stale then
      call('DEL', account)
    end
    call('HSET', account, 'h', totals, field, pack(PAIR, 1, cost))
    call('PEXPIRE', account, ttl(finish - now, grace))
  end
  if reached > alerted then
    call('HSET', account, 'a', reached)
  end
  if idem then
    local parts = {int(now + IDEM_US), now_text, cost_text, int(balance - cost), int(finish)}
    for j = 1, n * 3 do
      parts[j + 5] = int(results[j + 7])
    end
    local record = concat(parts, ' ') .. '\n' .. charge .. '\n' .. sub(field, 3)
    if named then
      record = record .. '\n' .. (kp or '') .. '\n' .. named
    end
    call('SET', idem, record, 'PX', ttl(IDEM_US, grace))
  end
  if ledger then
    -- The ledger event, in the same step: a decision and its event cannot part (see
    -- meterkit/ledger/events.py for the entry; one field costs less than several).
    call('XADD', ledger, '*', 'c',
         charge .. '\n' .. account .. '\n' .. now_text .. '\n' .. cost_text .. '\n' .. field)
  end
  results[1], results[3], results[5], results[6], results[7] = 1, now, cost, balance - cost, finish
  return pack(R, spread(results)) .. tail
end
