-- End the tasks of an array that were never created (lib/array.lua): on a stop of the
-- array (STOPPED), or once the array's scheduling deadline has passed (FAILED,
-- SCHEDULE_TIMEOUT). One step, whatever their number: the array records how they
-- ended ('ended', 'eerr', 'emsg') and leaves its shape's queue, so placement never
-- creates them; reading one answers that record. Its created tasks end on their own
-- (store.py stops those still PENDING or RUNNING; each has its own deadline).
--
-- Safe to run twice: an array that has ended is left alone (answer 0), and a stop's
-- token makes a retry answer as the first run did (2).
--
-- KEYS: 1 the array's record, 2 its shape's queue, 3 deadlines, 4 the tenant's active
--       index, 5 its status counts, 6 terminal, 7 the shape's hash, 8 the tenant's
--       package use, 9 stats
-- ARGV: 1 the array's ref, 2 its id, 3 mode: 'stop' or 'deadline', 4 the status its
--       uncreated tasks take, 5 their error_type, 6 their message, 7 the stop's token
-- Returns {code, n}: 1 n tasks ended now, 0 nothing to do (ended already, no task left
-- to create, or its deadline not reached), 2 this stop already ran, -1 not an array,
-- -2 no such record.
--! include lib/counts.lua
--! include lib/changes.lua
--! include lib/array.lua
local a = redis.call('HMGET', KEYS[1], 'status', 'acount', 'anext', 'askip', 'ended', 'deadline', 'stop')
if not a[1] then return {-2, 0} end
if a[1] ~= 'ARRAY' then return {-1, 0} end
if ARGV[3] == 'stop' and a[7] == ARGV[7] then return {2, 0} end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if ARGV[3] == 'stop' then
  redis.call('HSET', KEYS[1], 'stop', ARGV[7])
elseif not a[6] or a[6] == '' or tonumber(a[6]) > now then
  return {0, 0}
end
local left = tonumber(a[2]) - tonumber(a[3]) - tonumber(a[4])
if (a[5] and a[5] ~= '') or left <= 0 then return {0, 0} end
redis.call('HSET', KEYS[1], 'ended', ARGV[4], 'eerr', ARGV[5], 'emsg', ARGV[6], 'eend', now)
count(KEYS[5], 'PENDING', -left)
count(KEYS[5], ARGV[4], left)
count(KEYS[1], 'n:PENDING', -left)
count(KEYS[1], 'n:' .. ARGV[4], left)
job_changed(KEYS[5], ARGV[1], 'ARRAY')
redis.call('HINCRBY', KEYS[9], 'completed:' .. ARGV[4] .. ':' .. ARGV[5], left)
array_drain({array = KEYS[1], ref = ARGV[1], id = ARGV[2], queue = KEYS[2], deadlines = KEYS[3], active = KEYS[4],
  shape = KEYS[7], pkguse = KEYS[8]})
array_settle(KEYS[1], ARGV[1], KEYS[6], now)
return {1, left}
