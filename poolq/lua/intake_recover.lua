-- Put the messages a stopped consumer had taken back on the queue (in their order)
-- and forget the consumer, unless it beat again meanwhile. A consumer that was only
-- paused may handle a message again after this: handling is idempotent by message id.
--
-- KEYS: 1 consumers, 2 its taken list, 3 the queue's list
-- ARGV: 1 consumer id, 2 cutoff ms (a last beat older: stopped)
-- Returns how many messages went back, or -1 if the consumer is alive.
local beat = redis.call('ZSCORE', KEYS[1], ARGV[1])
if beat and tonumber(beat) > tonumber(ARGV[2]) then return -1 end
local moved = 0
while redis.call('LMOVE', KEYS[2], KEYS[3], 'LEFT', 'RIGHT') do moved = moved + 1 end
redis.call('ZREM', KEYS[1], ARGV[1])
return moved
