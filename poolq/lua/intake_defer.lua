-- Put a taken queue message aside until a later time (its tenant's pending jobs are at
-- their limit): off the consumer's taken list and into poolq:intake:delayed in one
-- step, so that it is in exactly one of them. intake_take.lua puts it back on the queue.
--
-- KEYS: 1 the consumer's taken list, 2 delayed
-- ARGV: 1 message, 2 ms to wait
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[2]), ARGV[1])
redis.call('LREM', KEYS[1], 1, ARGV[1])
return 1
