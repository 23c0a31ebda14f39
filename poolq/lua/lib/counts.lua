-- A status count is written as its new value, never as a delta, and never below zero:
-- an append-only file that holds the same change twice (two redis-servers once wrote to
-- one) replays to a count that is off, never to a negative one (recount.lua repairs it).
local function count(counts, status, delta)
  local n = math.max(tonumber(redis.call('HGET', counts, status) or '0') + delta, 0)
  redis.call('HSET', counts, status, n)
end
