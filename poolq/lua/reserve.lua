-- Reserve capacity for a round of placement decisions. Each decision is checked
-- again here, atomically: the job is still held by this round's claim (poolq:claims:
-- a worker paused past its lease is fenced off), PENDING, unplaced, not being stopped
-- and within its scheduling deadline (past it, the deadline duty fails it); the node is
-- live (a fresh heartbeat for an agent node), not drained, and has the free capacity,
-- on its devices too (a GPU request takes specific GPUs, recorded on the job as "devs"),
-- and is not held for a job of higher priority (hold.lua); the holder placing there
-- ends the hold. Capacity a node keeps for a preempting job (preempt.lua) is not free to
-- any other job; that job placing there ends it.
-- So concurrent placement workers never over-commit a node and a job is never reserved
-- twice, whatever their caches believed.
--
-- The members of a gang (docs/scheduling.md, "Gangs") come as consecutive decisions
-- naming their lead, the one job the claim holds: they are reserved all or none.
--
-- Safe to run twice: a job this claim already reserved on that node answers 0 again.
--
-- What does not need to be written decision by decision (the placement counters, the
-- tenants served, the inventory log, the claim's bookkeeping) is gathered and written
-- once at the end: the script is atomic, so no one can tell, and a round costs fewer calls.
--
-- KEYS: 1 claimed, 2 inventory log, 3 heartbeats, 4 deadlines, 5 stats, 6 tenants served,
--       7 claims, 8 fairshare, then per decision 8 keys: job, node, node jobs, node inbox, shape,
--       node wake flag, the tenant's usage, the tenant's quota
-- ARGV: 1 node ttl ms, 2 wake ttl ms, 3 claim id, 4 the placement latency buckets
--       ("10,50,…" ms: poolq.model.PLACEMENT_LATENCY_BUCKETS_MS), 5 the fair-share
--       half-life ms, then per decision 5
--       values: ref, node id, seq, requests ("R=amount,R=amount"), the gang's lead ('' none)
-- Returns per decision (worker.scheduler.Reservation): 0 reserved, 1 job gone (placed, stopped, ended), 2 node not
-- available, 3 not enough free capacity, 4 over the tenant's quota, 5 no longer held
-- by this claim, 6 the node is held for a job of higher priority; then the node ids to wake.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl, claim_id = tonumber(ARGV[1]), ARGV[3]
local results, wake = {}, {}
local buckets, placed_in = {}, {}  -- placed_in[i]: placements whose latency is within buckets[i]
for le in string.gmatch(ARGV[4], '%d+') do
  buckets[#buckets + 1] = {le, tonumber(le)}
  placed_in[#buckets] = 0
end
local placed, latency_sum = 0, 0
-- Gathered for the end: tenants placed for, nodes changed (each once, in order), jobs
-- placed (off the deadlines), jobs the claim lets go (placed, gone, or of a broken gang).
local served, changed, placed_refs, released = {}, {}, {}, {}
local first = 8
local n = (#KEYS - first) / 8

-- What the script reads but never writes, read once a run.
local parsed, attempts_of, limits_of = {}, {}, {}
-- A requests text as a list of {name, amount}.
local function requests(text)
  local list = parsed[text]
  if not list then
    list = {}
    for name, amount in string.gmatch(text, '([^=,]+)=(%d+)') do list[#list + 1] = {name, tonumber(amount)} end
    parsed[text] = list
  end
  return list
end
local function shape_attempts(shape)
  local a = attempts_of[shape]
  if not a then
    a = tonumber(redis.call('HGET', shape, 'attempts') or '0')
    attempts_of[shape] = a
  end
  return a
end
-- A tenant's limits, per resource a decision requests (false: none).
local function limits(quota, d)
  local key = quota .. '|' .. d.text
  local l = limits_of[key]
  if not l then
    l = {}
    for r, item in ipairs(d.requests) do l[r] = tonumber(redis.call('HGET', quota, item[1]) or '') or false end
    limits_of[key] = l
  end
  return l
end

-- Which devices of a resource a request takes (worker.placement.allocate forecasts the
-- same): whole units take the first free devices, a fraction shares the fullest device
-- it fits on. A list of {id, milli}, {} when the node has no devices of it, nil when
-- they cannot hold it.
local function allocate(node, ids, name, amount, pending)
  if not ids then return {} end
  local devices = {}
  for id in string.gmatch(ids, '[^,]+') do
    local field = 'dev:' .. name .. ':' .. id
    devices[#devices + 1] = {id, tonumber(redis.call('HGET', node, field) or '0') + (pending and pending[node .. '|' .. field] or 0)}
  end
  local whole, fraction = math.floor(amount / 1000), amount % 1000
  local out, taken = {}, {}
  for _, d in ipairs(devices) do
    if #out < whole and d[2] == 0 then
      out[#out + 1] = {d[1], 1000}
      taken[d[1]] = true
    end
  end
  if #out < whole then return nil end
  if fraction > 0 then
    local best
    for _, d in ipairs(devices) do
      if not taken[d[1]] and d[2] + fraction <= 1000 and (not best or d[2] > best[2]) then best = d end
    end
    if not best then return nil end
    out[#out + 1] = {best[1], fraction}
  end
  return out
end

--! include lib/fair_share.lua
--! include lib/changes.lua
--! include lib/slices.lua

local function wake_node(kind, wake_flag, node_id)
  if kind == 'agent' and redis.call('SET', wake_flag, '1', 'NX', 'PX', ARGV[2]) then
    wake[#wake + 1] = node_id
  end
end
local function decision(i)
  local k, a = first + i * 8, 5 + i * 5
  return {job = KEYS[k+1], node = KEYS[k+2], node_jobs = KEYS[k+3], inbox = KEYS[k+4], shape = KEYS[k+5],
    wake_flag = KEYS[k+6], usage = KEYS[k+7], quota = KEYS[k+8], ref = ARGV[a+1], node_id = ARGV[a+2],
    seq = ARGV[a+3], requests = requests(ARGV[a+4]), text = ARGV[a+4], lead = ARGV[a+5]}
end
-- An amount already taken: what Redis holds, plus what the gang's members checked before
-- this one take (pending: "key|field" -> amount; nil for a decision alone).
local function taken(value, pending, key, field)
  return tonumber(value or '0') + (pending and pending[key .. '|' .. field] or 0)
end
-- Check one decision: its code (-1: this claim reserved it already), and what a
-- reservation takes. The amounts of a gang's members checked before it count as taken,
-- so that members sharing a node or a quota fit together.
local function check(d, pending)
  local j = redis.call('HMGET', d.job, 'status', 'node', 'stop', 'att_base', 'submit_time', 'deadline', 'claim',
    'shape', 'prio', 'preempt_until')
  local claimed_by = d.lead ~= '' and d.lead or d.ref
  local ours = redis.call('HGET', KEYS[7], claimed_by) == claim_id
  local code = 0
  local held = {}  -- the devices it takes: "GPU:0:1000" items
  local ends_hold, ends_taken = false, false
  local nd
  if j[2] == d.node_id and j[7] == claim_id then
    code = -1  -- reserved by this very claim: a retry after a lost reply
  elseif not ours then
    code = 5
  elseif j[1] ~= 'PENDING' or (j[2] and j[2] ~= '') or (j[3] and j[3] ~= '') or (j[6] and j[6] ~= '' and tonumber(j[6]) <= now) then
    code = 1
  else
    -- One read of the node: its state, then cap:, res: and devices: of each resource requested.
    local fields = {'state', 'drained', 'kind', 'hold', 'taken', 'pool'}
    for _, item in ipairs(d.requests) do
      fields[#fields + 1] = 'cap:' .. item[1]
      fields[#fields + 1] = 'res:' .. item[1]
      fields[#fields + 1] = 'devices:' .. item[1]
    end
    nd = redis.call('HMGET', d.node, unpack(fields))
    local kept = {}  -- what the node keeps for a preempting job (preempt.lua), not this one
    if nd[1] ~= 'live' or (nd[2] and nd[2] ~= '0') then
      code = 2
    elseif nd[3] == 'agent' then
      local hb = redis.call('ZSCORE', KEYS[3], d.node_id)
      if not hb or tonumber(hb) < now - ttl then code = 2 end
    end
    if code == 0 and nd[5] then
      local ref, untl, kept_requests = string.match(nd[5], '^([^|]+)|(%d+)|(.*)$')
      if ref == d.ref then
        ends_taken = true  -- the job the capacity was kept for: it is placed here now
      elseif tonumber(untl) > now then
        for name, amount in string.gmatch(kept_requests, '([^=,]+)=(%d+)') do kept[name] = tonumber(amount) end
      end
    end
    if code == 0 and nd[4] then
      local p, s, untl = string.match(nd[4], '^(-?%d+)|([^|]+)|(%d+)$')
      if s == j[8] then
        ends_hold = true  -- its holder places here: the hold did its work
      elseif tonumber(untl) > now and tonumber(j[9] or '0') < tonumber(p) and not ends_taken then
        code = 6  -- (what a job preempted for is its own, whatever holds the node)
      end
    end
    if code == 0 then
      for r, item in ipairs(d.requests) do
        local name, amount = item[1], item[2]
        local cap = tonumber(nd[4 + 3 * r] or '0') - (kept[name] or 0)
        if cap - taken(nd[5 + 3 * r], pending, d.node, 'res:' .. name) < amount then code = 3 break end
        local devices = allocate(d.node, nd[6 + 3 * r], name, amount, pending)
        if not devices then code = 3 break end
        for _, dev in ipairs(devices) do held[#held + 1] = name .. ':' .. dev[1] .. ':' .. dev[2] end
      end
    end
    if code == 0 then
      for r, limit in ipairs(limits(d.quota, d)) do
        local name = d.requests[r][1]
        if limit and taken(redis.call('HGET', d.usage, name), pending, d.usage, name) + d.requests[r][2] > limit then
          code = 4
          break
        end
      end
    end
  end
  if code == 0 and pending then  -- what it takes counts for the members checked after it
    for _, item in ipairs(d.requests) do
      local name, amount = item[1], item[2]
      pending[d.node .. '|res:' .. name] = (pending[d.node .. '|res:' .. name] or 0) + amount
      pending[d.usage .. '|' .. name] = (pending[d.usage .. '|' .. name] or 0) + amount
    end
    for _, item in ipairs(held) do
      local name, id, milli = string.match(item, '^([^:]+):([^:]+):(%d+)$')
      local field = d.node .. '|dev:' .. name .. ':' .. id
      pending[field] = (pending[field] or 0) + tonumber(milli)
    end
  end
  return code, {j = j, nd = nd, held = held, ends_hold = ends_hold, ends_taken = ends_taken, ours = ours}
end
local function commit(d, code, c)
  local j, nd, held = c.j, c.nd, c.held
  if code == 0 then
    local tenant = string.sub(d.ref, 1, string.find(d.ref, ':', 1, true) - 1)
    if not served[tenant] then  -- once a run: later decisions of the run are at the same time
      settle(KEYS[8], tenant, d.usage, now, tonumber(ARGV[5]))
      served[tenant] = true
      served[#served + 1] = tenant
    end
    for _, item in ipairs(d.requests) do
      redis.call('HINCRBY', d.node, 'res:' .. item[1], item[2])
      redis.call('HINCRBY', d.usage, item[1], item[2])
    end
    for _, item in ipairs(held) do
      local name, id, milli = string.match(item, '^([^:]+):([^:]+):(%d+)$')
      redis.call('HINCRBY', d.node, 'dev:' .. name .. ':' .. id, milli)
    end
    if #held > 0 then redis.call('HSET', d.job, 'devs', table.concat(held, ',')) end
    if c.ends_hold then redis.call('HDEL', d.node, 'hold') end
    if c.ends_taken then redis.call('HDEL', d.node, 'taken') end
    if j[10] then redis.call('HDEL', d.job, 'preempt_until') end
    local attempts = shape_attempts(d.shape) - tonumber(j[4] or '0') + 1
    if attempts < 1 then attempts = 1 end
    redis.call('HSET', d.job, 'node', d.node_id, 'pool', nd[6],
      'res', d.text, 'attempts', attempts, 'reasons', '[]', 'placed_time', now, 'claim', claim_id)
    redis.call('HDEL', d.job, 'message')  -- a retried job's "waits for placement": the record now says where
    local latency = now - tonumber(j[5] or now)
    for b, le in ipairs(buckets) do
      if latency <= le[2] then placed_in[b] = placed_in[b] + 1 end
    end
    placed, latency_sum = placed + 1, latency_sum + latency
    redis.call('SADD', d.node_jobs, d.ref)
    job_changed(d.usage, d.ref, 'PENDING', d.node_id)
    placed_refs[#placed_refs + 1] = d.ref
    if not changed[d.node_id] then
      changed[d.node_id] = true
      changed[#changed + 1] = d.node_id
    end
    if nd[3] == 'agent' then redis.call('ZADD', d.inbox, d.seq, d.ref) end
    wake_node(nd[3], d.wake_flag, d.node_id)
  elseif code == -1 then
    code = 0
    wake_node(redis.call('HGET', d.node, 'kind'), d.wake_flag, d.node_id)
  end
  if c.ours and (code == 0 or code == 1) then
    released[#released + 1] = d.ref
  end
  return code
end
-- A decision alone is checked and made at once. The members of a gang come together,
-- under their lead: all are checked first, and made only if every one passed; else
-- none is, and each answers the code of the first that failed (all or none).
local i = 0
while i < n do
  local d = decision(i)
  if d.lead == '' then
    local code, c = check(d, nil)
    results[#results + 1] = commit(d, code, c)
    i = i + 1
  else
    local group = {d}
    while i + #group < n and ARGV[5 + (i + #group) * 5 + 5] == d.lead do group[#group + 1] = decision(i + #group) end
    local pending, checks, failed = {}, {}, nil
    for g, member in ipairs(group) do
      local code, c = check(member, pending)
      checks[g] = {code, c}
      if code ~= 0 and code ~= -1 and not failed then failed = code end
    end
    for g, member in ipairs(group) do
      local code, c = checks[g][1], checks[g][2]
      if failed then
        if c.ours and failed == 1 and member.ref == member.lead then  -- the gang is broken: its lead leaves the round
          released[#released + 1] = member.ref
        end
        results[#results + 1] = failed
      else
        results[#results + 1] = commit(member, code, c)
      end
    end
    i = i + #group
  end
end

if placed > 0 then
  for b, le in ipairs(buckets) do
    if placed_in[b] > 0 then redis.call('HINCRBY', KEYS[5], 'placement_le:' .. le[1], placed_in[b]) end
  end
  redis.call('HINCRBY', KEYS[5], 'placement_count', placed)
  redis.call('HINCRBY', KEYS[5], 'placement_sum_ms', latency_sum)
  for _, tenant in ipairs(served) do redis.call('ZADD', KEYS[6], now, tenant) end
  each_slice(placed_refs, function(...) redis.call('ZREM', KEYS[4], ...) end)
  for _, node_id in ipairs(changed) do redis.call('XADD', KEYS[2], 'MAXLEN', '~', 100000, '*', 'n', node_id) end
end
each_slice(released, function(...)
  redis.call('ZREM', KEYS[1], ...)
  redis.call('HDEL', KEYS[7], ...)
end)
return {results, wake}
