-- Store a new job and put it in line for placement, as one atomic step, so that an
-- accepted job can never be stored without being queued (or queued twice).
--
-- Safe to run twice: a second run of the same request finds its own fingerprint and
-- answers 1 ("already stored"), which the caller treats as accepted.
--
-- KEYS: 1 job hash, 2 tenant index, 3 shape hash, 4 shape queue, 5 shapes:ready,
--       6 shapes:blocked, 7 deadlines, 8 seq counter, 9 placement wake flag,
--       10 tenant's active index, 11 tenant's status counts, 12 tenant's quota,
--       13 tenants set, 14 stats, 15 tenant's limits, 16 the package it runs from
--       (any placeholder key when none), 17 the tenant's package use, 18 packages,
--       19 shapes:idle, 20 resolve, 21 the tenant's stems, then for a gang's lead the job
--       keys of the gang's other members
-- ARGV: 1 fingerprint, 2 spec JSON, 3 shape sig, 4 shape spec JSON, 5 its schedule
--       timeout ms ('' none given: the tenant's schedule_timeout_ms, else ARGV[15]),
--       6 submission id, 7 job ref, 8 wake flag ttl ms, 9 requests "R=amount,...",
--       10 tenant, 11 package name ('' when the working_dir is not a package),
--       12 the package's member in packages, 13 its retry policy ("attempts|OUTCOME,…|
--       backoff ms", '' none), 14 its own runtime limit ms ('' none), 15 the service's
--       default schedule timeout ms, 16 its priority ('' none given: the tenant's
--       default_priority, else 0), 17 what it depends on ("ok|<id>,any|<id>,…", ''
--       none), 18 the job key prefix (poolq.keys.JOB_PREFIX), 19 its part in a gang ('' none,
--       'member', or 'lead': the gang's last member), 20 its gang id ('' none), 21 the
--       number of tasks of an array ('' a single job), 22 an array's task template
--       (lib/array.lua)
-- Returns {code, wake, ...} (poolq.store.Submitted): code 0 stored, 1 the same request
-- is already stored, 2 another request holds this id, 3 the tenant's max pending is
-- reached {3, 0, pending, limit}, 4 the job alone exceeds the tenant's quota
-- {4, 0, resource, amount, limit}, 5 its package was not uploaded, 7 its priority is
-- above the tenant's max_priority {7, 0, priority, limit}, 8 a job it depends on does not
-- exist in its tenant {8, 0, 'ok'|'any', id}, 9 a gang's lead found the gang's member at
-- this position (1-based, in KEYS after 21) not stored as a waiting member of the same
-- gang {9, 0, position}, 10 it depends on an array {10, 0, 'ok'|'any', id}, 11 its id is a
-- task's of an array, or (an array) jobs named as its tasks exist {11, 0, array id};
-- wake 1 when the caller must
-- send a wake-up. Each outcome is counted in stats under its code.
--
-- Its place in line (the score in its shape's queue, the job's "seq" field) is its
-- sequence number less priority * 2^40: higher priority first, then oldest first
-- (poolq.model.priority_of reads the priority back). Priority 0 places by seq alone.
--
-- A job with dependencies is stored but not put in line: it joins each dependency's
-- dependents, counts them in deps_left, and gets no deadline yet; resolve.lua puts it
-- in line (its deadline counted from then) once the last one is resolved. A dependency
-- that has ended already is queued for resolving at once.
--
-- A gang (docs/scheduling.md, "Gangs") waits in line as one entry: its members share
-- one shape, whose spec lists them all, and only the last member, the lead, is queued.
-- A member is stored with its deadline but in no queue. The lead is stored only if
-- every other member is stored, waiting, in the same gang shape; then it writes the
-- gang's spec, gives every member its own deadline (one deadline for the gang), and
-- puts itself in line. A gang whose lead is refused is never placed: its caller ends
-- and removes the members (JobStore._unform_gangs), and their deadlines end them else.
--
-- An array (ARGV[21]) is stored as one record and waits in its shape's queue as one
-- member (lib/array.lua), whatever its size; its tasks count as PENDING from now on, so
-- they are held against the tenant's max pending all at once. Task ids (<id>-<i>) must
-- stay free: the tenant's stems count its jobs named <stem>-<digits>, so that an array
-- is refused when a job holds one of its ids, and such a job when an array holds it.
--
--! include lib/counts.lua
--! include lib/changes.lua
local function counted(code)
  redis.call('HINCRBY', KEYS[14], 'submissions:' .. ARGV[10] .. ':' .. code, 1)
  return code
end
local existing = redis.call('HGET', KEYS[1], 'fp')
if existing then
  if existing == ARGV[1] then return {counted(1), 0} end
  return {counted(2), 0}
end
for name, amount in string.gmatch(ARGV[9], '([^=,]+)=(%d+)') do
  local limit = redis.call('HGET', KEYS[12], name)
  if limit and tonumber(amount) > tonumber(limit) then return {counted(4), 0, name, amount, limit} end
end
local max_pending, tenant_timeout, default_priority, max_priority = unpack(redis.call('HMGET', KEYS[15],
  'max_pending', 'schedule_timeout_ms', 'default_priority', 'max_priority'))
local priority = tonumber(ARGV[16]) or tonumber(default_priority) or 0
if max_priority and priority > tonumber(max_priority) then return {counted(7), 0, priority, max_priority} end
local tasks = tonumber(ARGV[21])
if max_pending then
  local pending = tonumber(redis.call('HGET', KEYS[11], 'PENDING') or '0')
  if pending + (tasks or 1) > tonumber(max_pending) then return {counted(3), 0, pending, max_pending} end
end
local package = ARGV[11]
if package ~= '' and redis.call('EXISTS', KEYS[16]) == 0 then return {counted(5), 0} end
local tenant_prefix = ARGV[18] .. ARGV[10] .. ':'
local deps = {}
for kind, id in string.gmatch(ARGV[17], '(%a+)|([^,]+)') do
  local status = redis.call('HGET', tenant_prefix .. id, 'status')
  if not status then return {counted(8), 0, kind, id} end
  if status == 'ARRAY' then return {counted(10), 0, kind, id} end
  deps[#deps + 1] = {kind, ARGV[10] .. ':' .. id, status}
end
local role = ARGV[19] or ''
if role == 'lead' then
  for i = 22, #KEYS do
    local m = redis.call('HMGET', KEYS[i], 'status', 'shape', 'node', 'gang')
    if m[1] ~= 'PENDING' or m[2] ~= ARGV[3] or (m[3] and m[3] ~= '') or m[4] ~= ARGV[20] then
      return {counted(9), 0, i - 21}
    end
  end
end
local stem, index = string.match(ARGV[6], '^(.+)-(%d+)$')
if stem and index ~= '0' and string.sub(index, 1, 1) == '0' then stem = nil end  -- never a task's index
if stem then
  local of = tonumber(redis.call('HGET', tenant_prefix .. stem, 'acount') or '0')
  if tonumber(index) < of then return {counted(11), 0, stem} end
end
if tasks and redis.call('HEXISTS', KEYS[21], ARGV[6]) == 1 then return {counted(11), 0, ARGV[6]} end
counted(0)
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local seq = redis.call('INCR', KEYS[8])
local place = string.format('%.0f', seq - priority * 1099511627776)
local timeout = tonumber(ARGV[5]) or tonumber(tenant_timeout) or tonumber(ARGV[15])
local deadline = ''
if timeout > 0 and #deps == 0 then deadline = now + timeout end
if role ~= 'member' then  -- a gang's spec and its live members are written by its lead
  redis.call('HSETNX', KEYS[3], 'spec', ARGV[4])
  redis.call('HINCRBY', KEYS[3], 'live', #KEYS - 20)  -- its spec is kept while a job of it lives
end
local base = redis.call('HGET', KEYS[3], 'attempts') or '0'
redis.call('HSET', KEYS[1], 'spec', ARGV[2], 'fp', ARGV[1], 'status', tasks and 'ARRAY' or 'PENDING',
  'submit_time', now, 'deadline', deadline, 'timeout_ms', timeout, 'seq', place,
  'shape', ARGV[3], 'att_base', base)
if stem then redis.call('HINCRBY', KEYS[21], stem, 1) end
if tasks then
  redis.call('HSET', KEYS[1], 'acount', tasks, 'anext', 0, 'askip', 0, 'ended', '', 'tpl', ARGV[22],
    'n:PENDING', tasks)
end
if priority ~= 0 then redis.call('HSET', KEYS[1], 'prio', priority) end
if role ~= '' then redis.call('HSET', KEYS[1], 'gang', ARGV[20]) end
if ARGV[13] ~= '' then redis.call('HSET', KEYS[1], 'retry', ARGV[13]) end
if ARGV[14] ~= '' then redis.call('HSET', KEYS[1], 'rt_limit', ARGV[14]) end
if package ~= '' then  -- a package is kept while a live job uses it (package_expire.lua)
  redis.call('HSET', KEYS[1], 'pkg', package)
  redis.call('HINCRBY', KEYS[17], package, 1)
  redis.call('ZADD', KEYS[18], now, ARGV[12])
end
redis.call('ZADD', KEYS[2], seq, ARGV[6])
redis.call('ZADD', KEYS[10], seq, ARGV[6])
count(KEYS[11], 'PENDING', tasks or 1)
job_changed(KEYS[11], ARGV[7], tasks and 'ARRAY' or 'PENDING')
redis.call('SADD', KEYS[13], ARGV[10])
if #deps > 0 then
  redis.call('HSET', KEYS[1], 'deps_left', #deps)
  for _, d in ipairs(deps) do
    redis.call('SADD', ARGV[18] .. d[2] .. ':dependents', d[1] .. '|' .. ARGV[7])
    if d[3] == 'SUCCEEDED' or d[3] == 'FAILED' or d[3] == 'STOPPED' then redis.call('LPUSH', KEYS[20], d[2]) end
  end
  if not redis.call('ZSCORE', KEYS[5], ARGV[3]) and not redis.call('ZSCORE', KEYS[6], ARGV[3]) then
    redis.call('ZADD', KEYS[19], 'NX', now, ARGV[3])  -- its shape is forgotten if it never runs
  end
  return {0, 0}
end
if role == 'member' then
  if deadline ~= '' then redis.call('ZADD', KEYS[7], deadline, ARGV[7]) end
  return {0, 0}
end
for i = 22, #KEYS do  -- the gang's one deadline
  redis.call('HSET', KEYS[i], 'deadline', deadline)
  local member = string.sub(KEYS[i], #ARGV[18] + 1)
  if deadline ~= '' then redis.call('ZADD', KEYS[7], deadline, member) else redis.call('ZREM', KEYS[7], member) end
end
redis.call('ZADD', KEYS[4], place, tasks and ARGV[7] .. '~' or ARGV[7])
if not redis.call('ZSCORE', KEYS[6], ARGV[3]) then
  redis.call('ZADD', KEYS[5], 'LT', place, ARGV[3])  -- the shape is as early as its earliest job
end
if deadline ~= '' then redis.call('ZADD', KEYS[7], deadline, ARGV[7]) end
if redis.call('SET', KEYS[9], '1', 'NX', 'PX', ARGV[8]) then return {0, 1} end
return {0, 0}
