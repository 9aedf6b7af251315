-- meterkit: helpers shared by every script (prepended to each one when it is loaded).
--
-- Every quantity is an integer: times in microseconds, credits in micro-credits.
-- Lua numbers are doubles, exact below 2^53; meterkit's policy checks keep every
-- product below that bound. Numbers are written to Redis through string.format
-- (see int() below), never tostring(), which would round to 14 digits.

-- Globals are looked up through Redis's guard on every use; locals are not.
local tonumber, error, floor = tonumber, error, math.floor
local format, match, rep, concat = string.format, string.match, string.rep, table.concat

-- floor(a / b) for non-negative integers, exact even where a / b rounds up.
local function idiv(a, b)
  local q = floor(a / b)
  if q * b > a then
    return q - 1
  elseif (q + 1) * b <= a then
    return q + 1
  end
  return q
end

-- An integer as text. '%d' is cheaper, but exact only within a C long, which may
-- be 32 bits wide; '%.0f' is exact for every integer a double holds.
local function int(x)
  if x < 2147483648 and x > -2147483648 then
    return format('%d', x)
  end
  return format('%.0f', x)
end

-- A key holds something meterkit did not write: a typed error, before any write.
local function corrupt(key)
  error({err = 'METERKIT_STATE unexpected value at ' .. key})
end

-- The organization's account (a HASH per month): 'h' holds the month's totals as four
-- 8-byte little-endian integers (HEAD): the month's start µs, µ-credits used, µ-credits
-- topped up, and the allowance override (a copy of the override key made when the
-- month's account starts, kept by set_allowance; -1 for none), then a copy of the
-- organization's plan record if it has one (made when the month's account starts, kept
-- by assign.lua: a check reads it with the totals); 'q|<op>|<key>' holds each pair's
-- requests and µ-credits (PAIR). Binary, so that a check parses and prints no number of
-- the account's. Whatever rewrites 'h' keeps what follows the totals.
local HEAD, PAIR = '<i8i8i8i8', '<i8i8'
local EXACT = 9007199254740992  -- 2^53: every integer below it is exact as a double

-- The totals of an account's 'h', checked.
local function head_of(head, account)
  if #head < 32 then
    corrupt(account)
  end
  local period, used, topup, override = struct.unpack(HEAD, head)
  if not (period > -EXACT and period < EXACT and used >= 0 and used < EXACT
          and topup >= 0 and topup < EXACT and override >= -1 and override < EXACT) then
    corrupt(account)
  end
  return period, used, topup, override
end

-- The requests and µ-credits of an account's 'q|<op>|<key>', checked.
local function pair_of(pair, account)
  if #pair ~= 16 then
    corrupt(account)
  end
  local requests, spent = struct.unpack(PAIR, pair)
  if not (requests >= 0 and requests < EXACT and spent >= 0 and spent < EXACT) then
    corrupt(account)
  end
  return requests, spent
end

-- The organization's allowance override (a STRING of µ-credits), or false if none.
local function allowance_of(key)
  local text = redis.call('GET', key)
  if not text then
    return false
  end
  local micro = tonumber(text)
  if not micro or micro % 1 ~= 0 or micro < 0 or micro >= EXACT then
    corrupt(key)
  end
  return micro
end

-- Microseconds now: the client's clock when given, else the server's TIME (Redis 5+
-- replicates a script's effects, not the script, so TIME may precede writes).
local function clock(arg)
  if arg ~= '' then
    return tonumber(arg)
  end
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
end

-- A TTL in milliseconds for state that matters `us` more microseconds, plus `grace`.
local function ttl(us, grace)
  return idiv(us + 999, 1000) + grace
end

-- The calendar month (UTC) holding `now`, as [start, end) in microseconds.
-- Days to civil date after H. Hinnant's algorithm, with months counted from March.
local DAY = 86400000000
local function month(now)
  local days = idiv(now, DAY)
  local z = days + 719468
  local era = idiv(z, 146097)
  local doe = z - era * 146097
  local yoe = idiv(doe - idiv(doe, 1460) + idiv(doe, 36524) - idiv(doe, 146096), 365)
  local doy = doe - (365 * yoe + idiv(yoe, 4) - idiv(yoe, 100))
  local mp = idiv(5 * doy + 2, 153)
  local first = days - (doy - idiv(153 * mp + 2, 5))
  local length = ({31, 30, 31, 30, 31, 31, 30, 31, 30, 31, 31, 28})[mp + 1]
  if mp == 11 then
    local y = yoe + era * 400 + 1
    if y % 4 == 0 and (y % 100 ~= 0 or y % 400 == 0) then
      length = 29
    end
  end
  return first * DAY, (first + length) * DAY
end
