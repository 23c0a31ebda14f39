-- A consumer of the poolq.submit queue takes messages: each moves, in this one step,
-- from the queue to the consumer's own list of messages taken (poolq:taken:<id>),
-- where it stays until handled (worker/intake.py), so that no reply lost on the way
-- and no consumer that dies can lose a message: the sweep puts back the list of a
-- consumer that stopped beating. Messages deferred until a time that has come go back
-- on the queue first.
--
-- Safe to run twice: a consumer handles everything it took before it takes more, so
-- messages still in its list were taken by a call whose reply it lost (or by a blocking
-- move whose reply it lost): they are answered again, and nothing new is taken.
--
-- KEYS: 1 consumers, 2 this consumer's taken list, 3 delayed, 4.. the queue's lists
--       (kombu's list for each priority, in the order to take from)
-- ARGV: 1 consumer id, 2 most messages to take
-- Returns the messages taken, oldest first.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], now, ARGV[1])
local held = redis.call('LRANGE', KEYS[2], 0, -1)
if #held > 0 then
  local oldest_first = {}
  for i = #held, 1, -1 do oldest_first[#oldest_first + 1] = held[i] end
  return oldest_first
end
for _, message in ipairs(redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now, 'LIMIT', 0, 100)) do
  redis.call('RPUSH', KEYS[4], message)  -- kombu pushes on the left and takes from the right
  redis.call('ZREM', KEYS[3], message)
end
local out, limit = {}, tonumber(ARGV[2])
for i = 4, #KEYS do
  while #out < limit do
    local message = redis.call('LMOVE', KEYS[i], KEYS[2], 'RIGHT', 'LEFT')
    if not message then break end
    out[#out + 1] = message
  end
end
return out
