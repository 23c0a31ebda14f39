-- Make blocked shapes ready again: capacity was freed or added, or their backoff ended.
--
-- KEYS: 1 shapes:blocked, 2 shapes:ready, 3 shapes:idle, 4.. the shapes' queues
-- ARGV: the shapes' sigs, in the order of their queues
-- Returns how many shapes have jobs waiting.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ready = 0
for i = 4, #KEYS do
  local sig = ARGV[i - 3]
  redis.call('ZREM', KEYS[1], sig)
  local head = redis.call('ZRANGE', KEYS[i], 0, 0, 'WITHSCORES')
  if #head > 0 then
    redis.call('ZADD', KEYS[2], head[2], sig)
    ready = ready + 1
  else
    redis.call('ZADD', KEYS[3], now, sig)
  end
end
return ready
