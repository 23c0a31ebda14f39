-- Change a node's state: drain it (no new placements), or take it out of service
-- before its jobs are failed (state 'dead' for a lost agent, 'removed' for a node
-- being deleted). A lost agent is only declared dead if its heartbeat is still old.
-- Taking a node out of service answers, in the same step, the jobs it held then: those
-- are the ones to fail, not jobs an agent that registers again meanwhile is given.
--
-- KEYS: 1 node hash, 2 heartbeats, 3 inventory log, 4 node jobs
-- ARGV: 1 id, 2 'drain' (by an operator: kept across re-registrations) | 'shutdown'
--       (an agent stopping: cleared when it registers again) | 'dead' | 'removed' |
--       'forget', 3 node ttl ms (for 'dead'),
--       4 incarnation: for 'forget', drop the heartbeat entry of that dead incarnation;
--       for 'shutdown' and 'removed' by an agent, act only while the node is still that
--       agent's (an old agent shutting down must not touch a new agent's node); '' any
-- Returns {0} no such node (or, for 'dead', its heartbeat is fresh again; for
-- 'forget', it registered again; for an agent's 'shutdown' or 'removed', another agent
-- has the node now), {-1} an operator's 'removed' of a live agent's node (refused),
-- {1} drained or forgotten, {1, incarnation, refs...} taken out of service.
if redis.call('EXISTS', KEYS[1]) == 0 then return {0} end
local action = ARGV[2]
if (action == 'shutdown' or action == 'removed') and ARGV[4] ~= ''
    and redis.call('HGET', KEYS[1], 'incarnation') ~= ARGV[4] then
  return {0}
end
if action == 'removed' and ARGV[4] == '' then
  -- An operator may not remove a live agent's node: its next heartbeat would bring it back.
  local n = redis.call('HMGET', KEYS[1], 'kind', 'state')
  if n[1] == 'agent' and n[2] == 'live' then return {-1} end
end
if action == 'drain' or action == 'shutdown' then
  redis.call('HSET', KEYS[1], 'drained', action == 'drain' and '1' or 'shutdown')
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', 100000, '*', 'n', ARGV[1])
  return {1}
end
if action == 'forget' then
  local n = redis.call('HMGET', KEYS[1], 'state', 'incarnation')
  if n[1] ~= 'dead' or n[2] ~= ARGV[4] then return {0} end
  redis.call('ZREM', KEYS[2], ARGV[1])
  return {1}
end
if action == 'dead' then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  local hb = redis.call('ZSCORE', KEYS[2], ARGV[1])
  if hb and tonumber(hb) >= now - tonumber(ARGV[3]) then return {0} end
  redis.call('HSET', KEYS[1], 'state', 'dead')
else
  redis.call('HSET', KEYS[1], 'state', 'removed')
end
redis.call('XADD', KEYS[3], 'MAXLEN', '~', 100000, '*', 'n', ARGV[1])
local out = {1, redis.call('HGET', KEYS[1], 'incarnation') or '0'}
for _, ref in ipairs(redis.call('SMEMBERS', KEYS[4])) do out[#out + 1] = ref end
return out
