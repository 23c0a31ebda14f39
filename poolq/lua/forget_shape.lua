-- Forget a shape that has had no waiting job for a while: its hash and empty queue.
-- A shape that got jobs again (or is ready or blocked) is only taken off the idle list;
-- one whose jobs still live (claimed, placed, running: they may come back to its queue)
-- is kept and looked at again later.
--
-- KEYS: 1 shape hash, 2 shape queue, 3 shapes:ready, 4 shapes:blocked, 5 shapes:idle
-- ARGV: 1 sig
-- Returns 1 forgotten, 0 in use again.
redis.call('ZREM', KEYS[5], ARGV[1])
if redis.call('ZCARD', KEYS[2]) > 0 or redis.call('ZSCORE', KEYS[3], ARGV[1]) or redis.call('ZSCORE', KEYS[4], ARGV[1]) then
  return 0
end
if tonumber(redis.call('HGET', KEYS[1], 'live') or '0') > 0 then
  local t = redis.call('TIME')
  redis.call('ZADD', KEYS[5], tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000), ARGV[1])
  return 0
end
redis.call('DEL', KEYS[1], KEYS[2])
return 1
