-- Job arrays (docs/scheduling.md, "Arrays"). An array is one record, the job hash of its
-- id, with status 'ARRAY': the tasks' template (tpl: the task's spec text cut where its
-- index goes), acount tasks, the cursor anext (the next index to create), askip (tasks
-- at or past the cursor created early, by a stop of that one task, each also marked
-- 'early:<index>'), ended (''; or the
-- status its uncreated tasks took when the array was stopped or its deadline passed),
-- and per status how many of its tasks are in it (n:PENDING counts the uncreated ones).
-- Task <i> is the job <id>-<i>, created when placement reaches it (claim.lua) or when
-- it alone is stopped (array_task.lua); its record has arr (the array's id) and aidx
-- (i), and the array's key is the task's less "-<i>". The array waits in its shape's
-- queue as one member, its ref followed by '~', under its place in line.
-- Needs lib/counts.lua included before it.

-- A task's change of status, counted in its array too (while the array's record exists).
local function count_in_array(job_key, index, status, delta)
  if not index or index == '' then return end
  local array_key = string.sub(job_key, 1, #job_key - #index - 1)
  if redis.call('EXISTS', array_key) == 1 then count(array_key, 'n:' .. status, delta) end
end

-- Once none of its tasks is PENDING or RUNNING, the array has ended: retention takes it.
local function array_settle(array_key, array_ref, terminal, now)
  local n = redis.call('HMGET', array_key, 'n:PENDING', 'n:RUNNING', 'status')
  if n[3] ~= 'ARRAY' or tonumber(n[1] or '0') > 0 or tonumber(n[2] or '0') > 0 then return end
  if redis.call('ZADD', terminal, 'NX', now, array_ref) == 1 then redis.call('HSET', array_key, 'end_time', now) end
end

-- No task is left to create: the array leaves its shape's queue, the deadlines (its
-- tasks carry their own) and the active index, and gives back its hold on its shape's
-- spec and its package. Runs once per array (the 'drained' flag).
local function array_drain(k)
  if redis.call('HSETNX', k.array, 'drained', '1') == 0 then return end
  redis.call('ZREM', k.queue, k.ref .. '~')
  redis.call('ZREM', k.deadlines, k.ref)
  redis.call('ZREM', k.active, k.id)
  if redis.call('HEXISTS', k.shape, 'spec') == 1 then redis.call('HINCRBY', k.shape, 'live', -1) end
  local pkg = redis.call('HGET', k.array, 'pkg')
  if pkg and pkg ~= '' then redis.call('HINCRBY', k.pkguse, pkg, -1) end
end

local ARRAY_FIELDS = {'acount', 'anext', 'askip', 'ended', 'tpl', 'submit_time', 'deadline', 'timeout_ms', 'seq',
  'shape', 'att_base', 'prio', 'retry', 'rt_limit', 'pkg'}

local function array_read(array_key)
  local v = redis.call('HMGET', array_key, unpack(ARRAY_FIELDS))
  if not v[1] then return nil end
  local a = {}
  for i, name in ipairs(ARRAY_FIELDS) do a[name] = v[i] or '' end
  return a
end

-- Create task `index` of the array as a PENDING job (same fields as submit.lua writes,
-- its place in line the array's), listed and active from now on. Its PENDING was
-- counted when the array was accepted. k holds the keys: array, ref, id, tenant, job
-- (the task's key), jobs, active, seq, deadlines, shape, pkguse.
local function array_make_task(k, a, index)
  local tpl = cjson.decode(a.tpl)
  local spec = table.concat(tpl, tostring(index))
  local id = k.id .. '-' .. index
  redis.call('HSET', k.job, 'spec', spec, 'fp', 'array', 'status', 'PENDING', 'submit_time', a.submit_time,
    'deadline', a.deadline, 'timeout_ms', a.timeout_ms, 'seq', a.seq, 'shape', a.shape, 'att_base', a.att_base,
    'arr', k.id, 'aidx', index)
  if a.prio ~= '' then redis.call('HSET', k.job, 'prio', a.prio) end
  if a.retry ~= '' then redis.call('HSET', k.job, 'retry', a.retry) end
  if a.rt_limit ~= '' then redis.call('HSET', k.job, 'rt_limit', a.rt_limit) end
  if a.pkg ~= '' then
    redis.call('HSET', k.job, 'pkg', a.pkg)
    redis.call('HINCRBY', k.pkguse, a.pkg, 1)
  end
  local listed = redis.call('INCR', k.seq)  -- listed by when it became a record
  redis.call('ZADD', k.jobs, listed, id)
  redis.call('ZADD', k.active, listed, id)
  if a.deadline ~= '' then redis.call('ZADD', k.deadlines, a.deadline, k.tenant .. ':' .. id) end
  redis.call('HINCRBY', k.shape, 'live', 1)
  return k.tenant .. ':' .. id
end
