-- Put claimed jobs of one shape back in line, after a round that did not place them.
-- When the round found no node for the shape, count the attempt, keep its reasons
-- and block the shape for a backoff of 100 ms doubling with each failed attempt, up
-- to a cap (or until capacity is freed, see unblock.lua): its other jobs need the
-- same and would not fit either.
--
-- KEYS: 1 claimed, 2 shapes:ready, 3 shapes:blocked, 4 shape hash, 5 shape queue,
--       6 shapes:idle, 7.. job hashes
-- ARGV: 1 sig, 2 longest backoff ms, 3 reasons JSON ('' when no attempt was made:
--       the shape is ready again now), then per job: ref, seq
for i = 7, #KEYS do
  local a = 4 + (i - 7) * 2
  local ref, seq = ARGV[a], ARGV[a + 1]
  redis.call('ZREM', KEYS[1], ref)
  local j = redis.call('HMGET', KEYS[i], 'status', 'node', 'stop')
  if j[1] == 'PENDING' and (not j[2] or j[2] == '') and (not j[3] or j[3] == '') then
    redis.call('ZADD', KEYS[5], seq, ref)
  end
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if ARGV[3] ~= '' then
  local before = redis.call('HINCRBY', KEYS[4], 'attempts', 1) - 1
  redis.call('HSET', KEYS[4], 'reasons', ARGV[3])
  local backoff = math.min(100 * 2 ^ math.min(before, 16), tonumber(ARGV[2]))
  redis.call('ZADD', KEYS[3], now + backoff, ARGV[1])
  redis.call('ZREM', KEYS[2], ARGV[1])
elseif not redis.call('ZSCORE', KEYS[3], ARGV[1]) then
  local head = redis.call('ZRANGE', KEYS[5], 0, 0, 'WITHSCORES')
  if #head > 0 then
    redis.call('ZADD', KEYS[2], head[2], ARGV[1])
  else
    redis.call('ZADD', KEYS[6], now, ARGV[1])
  end
end
return 1
