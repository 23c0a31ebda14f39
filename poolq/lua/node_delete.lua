-- Delete a node whose jobs have all been failed and released (state 'removed').
--
-- KEYS: 1 node hash, 2 node jobs, 3 node inbox, 4 nodes set, 5 heartbeats, 6 inventory log
-- ARGV: 1 id
-- Returns 1 deleted, 0 jobs still hold reservations on it (fail them first), 2 an agent
-- registered it again meanwhile (it is left alone).
local state = redis.call('HGET', KEYS[1], 'state')
if state and state ~= 'removed' then return 2 end
if redis.call('SCARD', KEYS[2]) > 0 then return 0 end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
redis.call('SREM', KEYS[4], ARGV[1])
redis.call('ZREM', KEYS[5], ARGV[1])
redis.call('XADD', KEYS[6], 'MAXLEN', '~', 100000, '*', 'n', ARGV[1])
return 1
