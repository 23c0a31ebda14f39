-- Change a node's state: drain it (no new placements), or take it out of service
-- before its jobs are failed (state 'dead' for a lost agent, 'removed' for a node
-- being deleted). A lost agent is only declared dead if its heartbeat is still old.
--
-- KEYS: 1 node hash, 2 heartbeats, 3 inventory log
-- ARGV: 1 id, 2 'drain' | 'dead' | 'removed', 3 node ttl ms (for 'dead')
-- Returns 1 changed, 0 no such node (or, for 'dead', its heartbeat is fresh again).
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if ARGV[2] == 'drain' then
  redis.call('HSET', KEYS[1], 'drained', '1')
elseif ARGV[2] == 'dead' then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  local hb = redis.call('ZSCORE', KEYS[2], ARGV[1])
  if hb and tonumber(hb) >= now - tonumber(ARGV[3]) then return 0 end
  redis.call('HSET', KEYS[1], 'state', 'dead')
else
  redis.call('HSET', KEYS[1], 'state', 'removed')
end
redis.call('XADD', KEYS[3], 'MAXLEN', '~', 100000, '*', 'n', ARGV[1])
return 1
