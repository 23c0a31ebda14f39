-- Claim waiting jobs for one placement round. Tenants take turns, each taking its jobs
-- in line order, and each turn goes to the tenant with the smallest share: its decayed
-- CPU use (poolq:fairshare, kept by reserve.lua and finish.lua), over its weight
-- (poolq:limits:<t> "weight", default 1); ties go to the one served least recently. So
-- over time tenants use the pool in proportion to their weights, and one tenant's
-- backlog cannot starve another's jobs (docs/scheduling.md).
--
-- Claimed jobs leave their shape's queue for poolq:claimed with a lease, and
-- poolq:claims names the claim that holds each: only that claim may reserve or requeue
-- them (reserve.lua, requeue.lua), so a worker that was paused past its lease cannot act
-- on jobs the sweep gave to another.
--
-- Safe to run twice: the answer is kept under the claim's id for its lease, and a
-- second run with the same id (a retry after a lost reply) answers it again.
--
-- A *suspect* (a job that was in the claim of a worker that died) is claimed alone, so
-- that if it kills the next worker too, it is known to be the one (worker/duties.py).
--
-- An array (lib/array.lua) waits in its shape's queue as one member: when its turn
-- comes, its next task is created here and claimed like any job, and the array keeps
-- its place until it has no task left to create. So accepting an array costs the same
-- whatever its size, and its tasks become records only as placement reaches them. The
-- keys of an array and its tasks are built from the prefixes in ARGV, as a task's key
-- is not known before its index is.
--
-- KEYS: 1 shapes:ready, 2 claimed, 3 shapes:idle, 4 suspects, 5 tenants served,
--       6 claims, 7 this claim's record, 8 fairshare, 9 the seq counter, 10 deadlines,
--       11.. the queues of the shapes named in ARGV
-- ARGV: 1 max jobs, 2 lease ms, 3 claim id, 4 the key prefix of tenants' limits,
--       5 of their usage ("poolq:tenant:"), 6 the fair-share half-life ms, 7 the job key
--       prefix, 8 the shape key prefix, 9 how many waiting jobs to read at most, then the m
--       shapes' sigs (in the order of their queues), then the m shapes' tenants (same order)
--
-- The queues are read in the order given (the caller lists each tenant's oldest shape, then
-- each one's next, ...). Each tenant keeps its best `max jobs` read so far, in line order;
-- once it has that many, a further shape of its is read only for the jobs that go before
-- the last of them, and not at all once its head does not (its later shapes are later
-- still). So a round's jobs come from as many shapes as it takes, and a tenant's priorities
-- and line order hold across its shapes. Shapes not read are left as they are.
-- Returns a flat list: ref, sig, seq, ref, sig, seq, ... in the order to place them.
--! include lib/fair_share.lua
--! include lib/counts.lua
--! include lib/array.lua
--! include lib/slices.lua
local done = redis.call('GET', KEYS[7])
if done then return cjson.decode(done) end
local limit, claim_id = tonumber(ARGV[1]), ARGV[3]
local first = 11
local a0 = 10  -- the first sig in ARGV
local m = #KEYS - first + 1
local max_read, read, reads, full = tonumber(ARGV[9]), 0, {}, {}  -- reads: the KEYS of the queues read
-- The best `limit` of a tenant's list and of a shape's jobs (a flat answer), both in line order.
local function best(list, jobs, sig, key, tenant)
  local out, a, b, n = {}, 1, 1, #jobs / 2
  while #out < limit and (a <= #list or b <= n) do
    if b > n or (a <= #list and list[a][3] <= tonumber(jobs[2 * b])) then
      out[#out + 1] = list[a]
      a = a + 1
    else
      out[#out + 1] = {jobs[2 * b - 1], sig, tonumber(jobs[2 * b]), key, tenant}
      b = b + 1
    end
  end
  return out
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local expires = now + tonumber(ARGV[2])
local per_tenant, tenants = {}, {}
for i = first, #KEYS do
  if read >= max_read then break end
  local sig, tenant = ARGV[i - first + a0], ARGV[m + i - first + a0]
  if not per_tenant[tenant] then
    per_tenant[tenant] = {}
    tenants[#tenants + 1] = tenant
  end
  local list, jobs = per_tenant[tenant], nil
  if #list < limit then  -- not a round's worth yet: all of it, put in order once it is
    jobs = redis.call('ZRANGE', KEYS[i], 0, limit - 1, 'WITHSCORES')
    for j = 1, #jobs, 2 do
      list[#list + 1] = {jobs[j], sig, tonumber(jobs[j + 1]), KEYS[i], tenant}
    end
    if #list >= limit then
      table.sort(list, function(x, y) return x[3] < y[3] end)
      for j = #list, limit + 1, -1 do list[j] = nil end
    end
  elseif not full[tenant] then  -- only what goes before the last of its best
    local head = redis.call('ZRANGE', KEYS[i], 0, 0, 'WITHSCORES')
    if #head == 0 then
      jobs = head  -- an empty queue: read, so that it goes idle below
    elseif tonumber(head[2]) >= list[limit][3] then
      full[tenant] = true  -- and its later shapes are later still
    else
      jobs = redis.call('ZRANGEBYSCORE', KEYS[i], '-inf', string.format('(%.0f', list[limit][3]),
        'WITHSCORES', 'LIMIT', 0, limit)
      per_tenant[tenant] = best(list, jobs, sig, KEYS[i], tenant)
    end
  end
  if jobs and not full[tenant] then
    read = read + #jobs / 2
    reads[#reads + 1] = i
  end
end
local served, oldest, share, weight = {}, {}, {}, {}
for _, tenant in ipairs(tenants) do
  table.sort(per_tenant[tenant], function(a, b) return a[3] < b[3] end)
  served[tenant] = tonumber(redis.call('ZSCORE', KEYS[5], tenant) or '0')
  local list = per_tenant[tenant]
  oldest[tenant] = #list > 0 and list[1][3] or math.huge
  weight[tenant] = tonumber(redis.call('HGET', ARGV[4] .. tenant, 'weight') or '1')
  -- its use up to now; what it holds now counts as a quarter second more
  local used, holds = fair_share_use(KEYS[8], tenant, ARGV[5] .. tenant .. ':usage', now, tonumber(ARGV[6]))
  share[tenant] = (used + holds * 0.25) / weight[tenant]
end
table.sort(tenants, function(a, b)
  if share[a] ~= share[b] then return share[a] < share[b] end
  if served[a] ~= served[b] then return served[a] < served[b] end
  return oldest[a] < oldest[b]
end)
local out, taken, alone, next_of = {}, 0, false, {}
for _, tenant in ipairs(tenants) do next_of[tenant] = 1 end
-- Jobs taken leave their queues for the claimed and the claims at the end, a call per
-- key and not per job (nothing below reads them before).
local leaving, leases, holders = {}, {}, {}  -- queue -> refs; expires, ref, ...; ref, claim id, ...
local function take(c)
  taken = taken + 1
  local queue = leaving[c[4]]
  if not queue then
    queue = {}
    leaving[c[4]] = queue
  end
  queue[#queue + 1] = c[1]
  leases[#leases + 1] = expires
  leases[#leases + 1] = c[1]
  holders[#holders + 1] = c[1]
  holders[#holders + 1] = claim_id
  out[#out + 1] = c[1]
  out[#out + 1] = c[2]
  out[#out + 1] = c[3]
end
local any_suspect = redis.call('ZCARD', KEYS[4]) > 0
-- An array's turn: create its next task and claim it. Returns whether a task was
-- taken, and whether the array has tasks left to create after it.
local arrays = {}
local function take_task(c)
  local aref = string.sub(c[1], 1, -2)
  local st = arrays[aref]
  if not st then
    local colon = string.find(aref, ':', 1, true)
    local tenant, id = string.sub(aref, 1, colon - 1), string.sub(aref, colon + 1)
    local tp = ARGV[5] .. tenant
    st = {a = array_read(ARGV[7] .. aref), k = {array = ARGV[7] .. aref, ref = aref, id = id, tenant = tenant,
      jobs = tp .. ':jobs', active = tp .. ':active', pkguse = tp .. ':pkguse', seq = KEYS[9],
      deadlines = KEYS[10], shape = ARGV[8] .. c[2], queue = c[4]}}
    arrays[aref] = st
  end
  local a, k = st.a, st.k
  if not a or a.ended ~= '' then  -- gone, or stopped: nothing to create
    redis.call('ZREM', c[4], c[1])
    return false, false
  end
  local total, nxt, skip = tonumber(a.acount), tonumber(a.anext), tonumber(a.askip)
  local index
  while nxt < total and not index do
    local job = ARGV[7] .. k.tenant .. ':' .. k.id .. '-' .. nxt
    if skip > 0 and redis.call('HEXISTS', k.array, 'early:' .. nxt) == 1 then
      skip = skip - 1  -- created early (array_task.lua): passed over
    else
      index, k.job = nxt, job
    end
    nxt = nxt + 1
  end
  a.anext, a.askip, st.dirty = tostring(nxt), tostring(skip), true
  if index then
    local task = array_make_task(k, a, index)
    taken = taken + 1
    redis.call('ZADD', KEYS[2], expires, task)
    redis.call('HSET', KEYS[6], task, claim_id)
    out[#out + 1] = task
    out[#out + 1] = c[2]
    out[#out + 1] = c[3]
  end
  local more = index ~= nil and total - nxt - skip > 0
  if not more then array_drain(k) end
  return index ~= nil, more
end
-- Each turn goes to the tenant with the smallest share so far (ties: the order above),
-- and each job it takes counts as a quarter CPU-second over its weight: with equal weights,
-- turns go round; with weights 3 and 1, three turns to one.
while taken < limit and not alone do
  local best
  for _, tenant in ipairs(tenants) do
    if per_tenant[tenant][next_of[tenant]] and (not best or share[tenant] < share[best]) then best = tenant end
  end
  if not best then break end
  local c = per_tenant[best][next_of[best]]
  if string.sub(c[1], -1) == '~' then
    local took, more = take_task(c)
    if not more then next_of[best] = next_of[best] + 1 end
    if took then share[best] = share[best] + 250 / weight[best] end
  else
    next_of[best] = next_of[best] + 1
    share[best] = share[best] + 250 / weight[best]
    if any_suspect and redis.call('ZSCORE', KEYS[4], c[1]) then
      if taken == 0 then  -- a suspect goes alone; otherwise it waits for a round of its own
        redis.call('ZREM', KEYS[4], c[1])
        take(c)
        alone = true
      end
    else
      take(c)
    end
  end
end
for queue, refs in pairs(leaving) do each_slice(refs, function(...) redis.call('ZREM', queue, ...) end) end
each_slice(leases, function(...) redis.call('ZADD', KEYS[2], ...) end)
each_slice(holders, function(...) redis.call('HSET', KEYS[6], ...) end)
for _, st in pairs(arrays) do
  if st.dirty then redis.call('HSET', st.k.array, 'anext', st.a.anext, 'askip', st.a.askip) end
end
for _, i in ipairs(reads) do
  local sig = ARGV[i - first + a0]
  local head = redis.call('ZRANGE', KEYS[i], 0, 0, 'WITHSCORES')
  if #head == 0 then
    redis.call('ZREM', KEYS[1], sig)
    redis.call('ZADD', KEYS[3], now, sig)  -- forgotten after an hour idle: forget_shape.lua
  else
    redis.call('ZADD', KEYS[1], 'XX', head[2], sig)
  end
end
redis.call('SET', KEYS[7], cjson.encode(out), 'PX', tonumber(ARGV[2]))
return out
