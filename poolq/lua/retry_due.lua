-- Put jobs whose retry backoff has ended back in line: each a PENDING job of an earlier
-- attempt (finish.lua), under its own seq in its shape's queue, the shape ready unless
-- it is blocked (its backoff, or no capacity: unblock.lua makes it ready).
--
-- Safe to run twice: only a job this run takes off poolq:retries goes back in line, and only
-- while it still waits (not placed, stopped or ended).
--
-- KEYS: 1 retries, 2 shapes:ready, 3 shapes:blocked, then per job 2 keys: its hash,
--       its shape's queue
-- ARGV: per job: ref, its shape's sig
-- Returns how many went back in line.
local back = 0
for i = 4, #KEYS, 2 do
  local a = i - 3
  local ref, sig = ARGV[a], ARGV[a + 1]
  local due = redis.call('ZREM', KEYS[1], ref) == 1  -- a second run finds it gone, and leaves it
  local j = redis.call('HMGET', KEYS[i], 'status', 'node', 'stop', 'seq', 'shape')
  if due and j[1] == 'PENDING' and (not j[2] or j[2] == '') and (not j[3] or j[3] == '') and j[5] == sig then
    redis.call('ZADD', KEYS[i + 1], j[4], ref)
    if not redis.call('ZSCORE', KEYS[3], sig) then redis.call('ZADD', KEYS[2], 'LT', j[4], sig) end
    back = back + 1
  end
end
return back
