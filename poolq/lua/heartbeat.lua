-- A node agent's heartbeat. Refused when the node was declared dead or another
-- agent registered the same id since: the agent must then stop its jobs (they
-- were failed as NODE_LOST) and register again.
--
-- KEYS: 1 node hash, 2 heartbeats
-- ARGV: 1 id, 2 the agent's incarnation
-- Returns 1 recorded, 0 register again.
local n = redis.call('HMGET', KEYS[1], 'state', 'incarnation')
if n[1] ~= 'live' or n[2] ~= ARGV[2] then return 0 end
local t = redis.call('TIME')
redis.call('ZADD', KEYS[2], tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000), ARGV[1])
return 1
