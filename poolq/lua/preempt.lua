-- Preempt: stop jobs of strictly lower priority on one node so that a waiting job that
-- nothing has room for fits there (docs/scheduling.md, "Preemption"). In one step: the
-- victims get their stop flag, as a stop request would set it, with the message that
-- finish.lua records when they end (FAILED, PREEMPTED, retried if their policy says so);
-- and what the waiting job asks for is *taken* on the node for it ("taken":
-- "ref|until|R=amount,…"), so that until it is placed (reserve.lua ends it) or the time
-- passes, no other job may use the node's capacity but what lies beyond it. Nothing is
-- reserved here: the job is reserved once the victims' ends have released their capacity,
-- so the node's reserved amounts never exceed its capacity, before, during or after.
--
-- Checked again here, whatever the placement worker read: the job is held by this claim,
-- PENDING, unplaced, not being stopped and not already preempting; the node is live, not
-- drained, fresh (agent) and not taken for another job; each victim is placed on the node,
-- RUNNING (or placed and not yet started), of lower priority, not a gang member and not
-- being stopped; and the node's free capacity plus what the victims hold covers the job.
--
-- Safe to run twice: the job's "preempt_until" makes a second run answer 2 and change
-- nothing.
--
-- KEYS: 1 the job, 2 node hash, 3 node jobs, 4 claims, 5 inventory log, 6 heartbeats,
--       7.. the victims' job keys
-- ARGV: 1 the job's ref, 2 claim id, 3 node id, 4 its requests ("R=amount,…"), 5 how long
--       the capacity is taken for it (ms), 6 node ttl ms, 7 the victims' message, 8.. the
--       victims' refs (same order as their keys)
-- Returns 1 preempted, 2 it is preempting already, 3 the job no longer waits for this
-- claim, 4 the node is not available (or taken for another job), 5 a victim is not one
-- any more, 6 the victims would not free enough.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local j = redis.call('HMGET', KEYS[1], 'status', 'node', 'stop', 'prio', 'preempt_until')
if j[5] and tonumber(j[5]) > now then return 2 end
if redis.call('HGET', KEYS[4], ARGV[1]) ~= ARGV[2] or j[1] ~= 'PENDING' or (j[2] and j[2] ~= '')
    or (j[3] and j[3] ~= '') then
  return 3
end
local priority = tonumber(j[4] or '0')
local nd = redis.call('HMGET', KEYS[2], 'state', 'drained', 'kind', 'taken')
if nd[1] ~= 'live' or (nd[2] and nd[2] ~= '0') then return 4 end
if nd[3] == 'agent' then
  local hb = redis.call('ZSCORE', KEYS[6], ARGV[3])
  if not hb or tonumber(hb) < now - tonumber(ARGV[6]) then return 4 end
end
if nd[4] then
  local ref, untl = string.match(nd[4], '^([^|]+)|(%d+)|')
  if ref ~= ARGV[1] and tonumber(untl) > now then return 4 end
end
local freed = {}
for i = 7, #KEYS do
  local ref = ARGV[i + 1]
  local v = redis.call('HMGET', KEYS[i], 'status', 'node', 'prio', 'stop', 'gang', 'res')
  if redis.call('SISMEMBER', KEYS[3], ref) == 0 or v[2] ~= ARGV[3] or (v[1] ~= 'RUNNING' and v[1] ~= 'PENDING')
      or tonumber(v[3] or '0') >= priority or (v[4] and v[4] ~= '') or (v[5] and v[5] ~= '') or not v[6]
      or v[6] == '' or (v[1] == 'PENDING' and nd[3] ~= 'agent') then  -- no agent would end it
    return 5
  end
  for name, amount in string.gmatch(v[6], '([^=,]+)=(%d+)') do freed[name] = (freed[name] or 0) + tonumber(amount) end
end
for name, amount in string.gmatch(ARGV[4], '([^=,]+)=(%d+)') do
  local cap = tonumber(redis.call('HGET', KEYS[2], 'cap:' .. name) or '0')
  local used = tonumber(redis.call('HGET', KEYS[2], 'res:' .. name) or '0')
  if cap - used + (freed[name] or 0) < tonumber(amount) then return 6 end
end
local untl = now + tonumber(ARGV[5])
for i = 7, #KEYS do
  redis.call('HSET', KEYS[i], 'stop', 'preempt:' .. ARGV[1], 'preempted_by', ARGV[7])
end
redis.call('HSET', KEYS[2], 'taken', ARGV[1] .. '|' .. string.format('%.0f', untl) .. '|' .. ARGV[4])
redis.call('HSET', KEYS[1], 'preempt_until', string.format('%.0f', untl))
redis.call('XADD', KEYS[5], 'MAXLEN', '~', 100000, '*', 'n', ARGV[3])
return 1
