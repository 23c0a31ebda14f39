-- Create one task of an array before placement reaches it, PENDING, in its shape's
-- queue like any waiting job, so that it can be stopped on its own (store.py stops it
-- next). The array's cursor passes over it later (askip; claim.lua).
--
-- Safe to run twice: a task that exists is left alone.
--
-- KEYS: 1 the array's record, 2 the task's record, 3 the tenant's job index, 4 its
--       active index, 5 the seq counter, 6 deadlines, 7 the shape's hash, 8 the
--       tenant's package use, 9 the shape's queue, 10 shapes:ready, 11 shapes:blocked
-- ARGV: 1 the array's ref, 2 its id, 3 the tenant, 4 the task's index
-- Returns 1 created, 0 it exists already or is not to be created (behind the cursor,
-- beyond the count, or the array has ended), -2 no such array.
--! include lib/counts.lua
--! include lib/array.lua
local a = array_read(KEYS[1])
if not a then return -2 end
if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
local index = tonumber(ARGV[4])
if a.ended ~= '' or index < tonumber(a.anext) or index >= tonumber(a.acount) then return 0 end
local k = {array = KEYS[1], ref = ARGV[1], id = ARGV[2], tenant = ARGV[3], job = KEYS[2], jobs = KEYS[3],
  active = KEYS[4], seq = KEYS[5], deadlines = KEYS[6], shape = KEYS[7], pkguse = KEYS[8], queue = KEYS[9]}
local task = array_make_task(k, a, index)
redis.call('ZADD', KEYS[9], a.seq, task)
if not redis.call('ZSCORE', KEYS[11], a.shape) then redis.call('ZADD', KEYS[10], 'LT', a.seq, a.shape) end
redis.call('HSET', KEYS[1], 'early:' .. index, 1)  -- the cursor passes over it, even once it is deleted
local skip = redis.call('HINCRBY', KEYS[1], 'askip', 1)
if tonumber(a.acount) - tonumber(a.anext) - skip <= 0 then array_drain(k) end
return 1
