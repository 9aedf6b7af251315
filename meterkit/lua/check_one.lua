-- meterkit check, one request per EVALSHA (see check.lua).
--
-- KEYS  check.lua's, from KEYS[1]; then the idempotency record, if the request has one
-- ARGV  1 now µs ('' = server TIME)  2 cost µ-credits  3 charge id  4 key id
--       5 operation  6, 7 the month the caller expects (start, end µs; checked)

local now, now_text = clock_text(ARGV[1])
return check(n, P, 0, now, now_text, ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7],
             KEYS[n + 3])
