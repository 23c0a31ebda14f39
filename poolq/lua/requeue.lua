-- Put claimed jobs of one shape back in line, after a round that did not place them,
-- or after their claim's lease expired (the sweep, worker/duties.py). Only the claim
-- that holds a job (poolq:claims) can put it back; a job that ended, was placed, or was
-- deleted and submitted again under its id meanwhile is left alone. It goes back under
-- its own seq, read from its record.
--
-- When the round found no node for the shape, count the attempt (once per round, so a
-- retried call counts nothing more), keep its reasons and block the shape for a
-- backoff of 100 ms doubling with each failed attempt, up to a cap (or until capacity
-- is freed, see unblock.lua): its other jobs need the same and would not fit either.
--
-- Safe to run twice: a job is only put back while its claim still holds it.
--
-- KEYS: 1 claimed, 2 shapes:ready, 3 shapes:blocked, 4 shape hash, 5 shape queue,
--       6 shapes:idle, 7 claims, 8 suspects, 9.. job hashes
-- ARGV: 1 sig, 2 longest backoff ms, 3 reasons JSON ('' when no attempt was made:
--       the shape is ready again now), 4 the round's claim id (for counting the
--       attempt once), 5 'suspect' to make each job a suspect (claimed alone next),
--       then per job: ref, the claim id that holds it, '1' to count a lost claim
--       against it (it was alone in a claim whose worker died)
-- Returns a flat list of ref, lost claims for the jobs whose count went up.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local out = {}
for i = 9, #KEYS do
  local a = 6 + (i - 9) * 3
  local ref, claim_id, lost = ARGV[a], ARGV[a + 1], ARGV[a + 2]
  if redis.call('HGET', KEYS[7], ref) == claim_id then
    redis.call('HDEL', KEYS[7], ref)
    redis.call('ZREM', KEYS[1], ref)
    local j = redis.call('HMGET', KEYS[i], 'status', 'node', 'stop', 'shape', 'seq')
    if j[1] == 'PENDING' and (not j[2] or j[2] == '') and (not j[3] or j[3] == '') and j[4] == ARGV[1] then
      redis.call('ZADD', KEYS[5], j[5], ref)
      if ARGV[5] == 'suspect' then redis.call('ZADD', KEYS[8], now, ref) end
      if lost == '1' then
        out[#out + 1] = ref
        out[#out + 1] = redis.call('HINCRBY', KEYS[i], 'lost_claims', 1)
      end
    end
  end
end
if ARGV[3] ~= '' then
  if redis.call('HGET', KEYS[4], 'round') ~= ARGV[4] then
    local before = redis.call('HINCRBY', KEYS[4], 'attempts', 1) - 1
    redis.call('HSET', KEYS[4], 'reasons', ARGV[3], 'round', ARGV[4])
    local backoff = math.min(100 * 2 ^ math.min(before, 16), tonumber(ARGV[2]))
    redis.call('ZADD', KEYS[3], now + backoff, ARGV[1])
    redis.call('ZREM', KEYS[2], ARGV[1])
  end
elseif not redis.call('ZSCORE', KEYS[3], ARGV[1]) then
  local head = redis.call('ZRANGE', KEYS[5], 0, 0, 'WITHSCORES')
  if #head > 0 then
    redis.call('ZADD', KEYS[2], head[2], ARGV[1])
  else
    redis.call('ZADD', KEYS[6], now, ARGV[1])
  end
end
return out
