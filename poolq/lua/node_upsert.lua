-- Add a node (poolq nodes add) or register a node agent (poolq node).
--
-- Safe to run twice: an agent's registration carries a token, and a second run with
-- the same token answers the incarnation the first one made.
--
-- KEYS: 1 node hash, 2 nodes set, 3 inventory log, 4 kick, 5 placement wake flag, 6 heartbeats
-- ARGV: 1 id, 2 pool, 3 labels JSON, 4 kind (static|agent), 5 'create' to refuse an
--       existing id, 6 wake ttl ms, 7 Celery queue of its agent ('' for static),
--       8 registration token ('' for static), 9 node facts JSON (enforcement mode…),
--       10 its devices, "GPU=0,1;NPU=0,1,2,3" ('' none), then resource/capacity pairs
-- Returns {code, wake, incarnation}: code 1 done, 0 the id exists (create only).
if ARGV[5] == 'create' and redis.call('EXISTS', KEYS[1]) == 1 then return {0, 0, 0} end
if ARGV[8] ~= '' then
  local n = redis.call('HMGET', KEYS[1], 'reg', 'state', 'incarnation')
  if n[1] == ARGV[8] and n[2] == 'live' then return {1, 0, tonumber(n[3])} end
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local fields = redis.call('HKEYS', KEYS[1])
local keep = {}
for i = 11, #ARGV, 2 do keep['cap:' .. ARGV[i]] = true end
for _, field in ipairs(fields) do
  if (string.sub(field, 1, 4) == 'cap:' and not keep[field]) or string.sub(field, 1, 8) == 'devices:' then
    redis.call('HDEL', KEYS[1], field)
  end
end
-- A device's use (dev:<R>:<id>, milli-units) is kept like a reservation: jobs may hold it.
for name, ids in string.gmatch(ARGV[10], '([^=;]+)=([^;]*)') do
  redis.call('HSET', KEYS[1], 'devices:' .. name, ids)
  for id in string.gmatch(ids, '[^,]+') do redis.call('HSETNX', KEYS[1], 'dev:' .. name .. ':' .. id, 0) end
end
-- An operator's drain outlives the agent restarting; the agent's own shutdown does not.
local drained = redis.call('HGET', KEYS[1], 'drained') == '1' and '1' or '0'
redis.call('HSET', KEYS[1], 'id', ARGV[1], 'pool', ARGV[2], 'labels', ARGV[3], 'kind', ARGV[4],
  'state', 'live', 'drained', drained, 'queue', ARGV[7], 'since', now, 'reg', ARGV[8], 'facts', ARGV[9])
for i = 11, #ARGV, 2 do
  redis.call('HSET', KEYS[1], 'cap:' .. ARGV[i], ARGV[i + 1])
  redis.call('HSETNX', KEYS[1], 'res:' .. ARGV[i], 0)
end
local incarnation = redis.call('HINCRBY', KEYS[1], 'incarnation', 1)
redis.call('SADD', KEYS[2], ARGV[1])
if ARGV[4] == 'agent' then redis.call('ZADD', KEYS[6], now, ARGV[1]) end
redis.call('XADD', KEYS[3], 'MAXLEN', '~', 100000, '*', 'n', ARGV[1])
redis.call('SET', KEYS[4], '1')
local wake = 0
if redis.call('SET', KEYS[5], '1', 'NX', 'PX', ARGV[6]) then wake = 1 end
return {1, wake, incarnation}
