-- Hold a node for a waiting job that no node has room for: until the hold ends, jobs
-- of lower priority are not placed on the node (reserve.lua), so the capacity that its
-- running jobs free accumulates for the held job instead of going to a stream of
-- smaller, lower-priority jobs (docs/scheduling.md). Jobs of the same or higher
-- priority still use it, and every other node stays open to everyone.
--
-- A node has one hold. A hold of another shape is only replaced when it has ended or is
-- of lower priority; the holder's own hold is extended. The hold lasts ARGV[3] ms: the
-- holder's shape fails again (and extends it) well within that while it still waits,
-- and a hold whose shape placed or went away simply ends.
--
-- Safe to run twice: the second run extends the hold it made.
--
-- KEYS: 1 node hash, 2 inventory log
-- ARGV: 1 the holder's priority, 2 its shape's sig, 3 how long the hold lasts (ms)
-- Returns 1 held (the inventory log says so when the hold is new), 0 held by another.
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local priority, sig = tonumber(ARGV[1]), ARGV[2]
local current = redis.call('HGET', KEYS[1], 'hold')
local new = true
if current then
  local p, s, untl = string.match(current, '^(-?%d+)|([^|]+)|(%d+)$')
  if s == sig and tonumber(p) == priority then
    new = false
  elseif tonumber(untl) > now and tonumber(p) >= priority then
    return 0
  end
end
redis.call('HSET', KEYS[1], 'hold', priority .. '|' .. sig .. '|' .. string.format('%.0f', now + tonumber(ARGV[3])))
if new then redis.call('XADD', KEYS[2], 'MAXLEN', '~', 100000, '*', 'n', redis.call('HGET', KEYS[1], 'id')) end
return 1
