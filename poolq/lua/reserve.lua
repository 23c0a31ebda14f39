-- Reserve capacity for a round of placement decisions. Each decision is checked
-- again here, atomically: the job is still held by this round's claim (poolq:claims:
-- a worker paused past its lease is fenced off), PENDING, unplaced, not being stopped
-- and within its scheduling deadline (past it, the deadline duty fails it); the node is
-- live (a fresh heartbeat for an agent node), not drained, and has the free capacity,
-- on its devices too (a GPU request takes specific GPUs, recorded on the job as "devs"),
-- and is not held for a job of higher priority (hold.lua); the holder placing there
-- ends the hold.
-- So concurrent placement workers never over-commit a node and a job is never reserved
-- twice, whatever their caches believed.
--
-- Safe to run twice: a job this claim already reserved on that node answers 0 again.
--
-- KEYS: 1 claimed, 2 inventory log, 3 heartbeats, 4 deadlines, 5 stats, 6 tenants served,
--       7 claims, 8 fairshare, then per decision 8 keys: job, node, node jobs, node inbox, shape,
--       node wake flag, the tenant's usage, the tenant's quota
-- ARGV: 1 node ttl ms, 2 wake ttl ms, 3 claim id, 4 the placement latency buckets
--       ("10,50,…" ms: poolq.model.PLACEMENT_LATENCY_BUCKETS_MS), 5 the fair-share
--       half-life ms, then per decision 4
--       values: ref, node id, seq, requests ("R=amount,R=amount")
-- Returns per decision (worker.scheduler.Reservation): 0 reserved, 1 job gone (placed, stopped, ended), 2 node not
-- available, 3 not enough free capacity, 4 over the tenant's quota, 5 no longer held
-- by this claim, 6 the node is held for a job of higher priority; then the node ids to wake.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl, claim_id = tonumber(ARGV[1]), ARGV[3]
local results, wake, settled = {}, {}, {}
local buckets = {}
for le in string.gmatch(ARGV[4], '%d+') do buckets[#buckets + 1] = le end
local first = 8
local n = (#KEYS - first) / 8
-- Which devices of a resource a request takes (worker.placement.allocate forecasts the
-- same): whole units take the first free devices, a fraction shares the fullest device
-- it fits on. A list of {id, milli}, {} when the node has no devices of it, nil when
-- they cannot hold it.
local function allocate(node, name, amount)
  local ids = redis.call('HGET', node, 'devices:' .. name)
  if not ids then return {} end
  local devices = {}
  for id in string.gmatch(ids, '[^,]+') do
    devices[#devices + 1] = {id, tonumber(redis.call('HGET', node, 'dev:' .. name .. ':' .. id) or '0')}
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

local function wake_node(node, wake_flag, node_id)
  if redis.call('HGET', node, 'kind') == 'agent' and redis.call('SET', wake_flag, '1', 'NX', 'PX', ARGV[2]) then
    wake[#wake + 1] = node_id
  end
end
for i = 0, n - 1 do
  local k, a = first + i * 8, 5 + i * 4
  local job, node, node_jobs, inbox, shape, wake_flag = KEYS[k+1], KEYS[k+2], KEYS[k+3], KEYS[k+4], KEYS[k+5], KEYS[k+6]
  local usage, quota = KEYS[k+7], KEYS[k+8]
  local ref, node_id, seq, requests = ARGV[a+1], ARGV[a+2], ARGV[a+3], ARGV[a+4]
  local j = redis.call('HMGET', job, 'status', 'node', 'stop', 'att_base', 'submit_time', 'deadline', 'claim',
    'shape', 'prio')
  local ours = redis.call('HGET', KEYS[7], ref) == claim_id
  local code = 0
  local held = {}  -- the devices it takes: "GPU:0:1000" items
  local ends_hold = false
  if j[2] == node_id and j[7] == claim_id then
    code = -1  -- reserved by this very claim: a retry after a lost reply
  elseif not ours then
    code = 5
  elseif j[1] ~= 'PENDING' or (j[2] and j[2] ~= '') or (j[3] and j[3] ~= '') or (j[6] and j[6] ~= '' and tonumber(j[6]) <= now) then
    code = 1
  else
    local nd = redis.call('HMGET', node, 'state', 'drained', 'kind', 'hold')
    if nd[1] ~= 'live' or (nd[2] and nd[2] ~= '0') then
      code = 2
    elseif nd[3] == 'agent' then
      local hb = redis.call('ZSCORE', KEYS[3], node_id)
      if not hb or tonumber(hb) < now - ttl then code = 2 end
    end
    if code == 0 and nd[4] then
      local p, s, untl = string.match(nd[4], '^(-?%d+)|([^|]+)|(%d+)$')
      if s == j[8] then
        ends_hold = true  -- its holder places here: the hold did its work
      elseif tonumber(untl) > now and tonumber(j[9] or '0') < tonumber(p) then
        code = 6
      end
    end
    if code == 0 then
      for name, amount in string.gmatch(requests, '([^=,]+)=(%d+)') do
        local cap = tonumber(redis.call('HGET', node, 'cap:' .. name) or '0')
        local used = tonumber(redis.call('HGET', node, 'res:' .. name) or '0')
        if cap - used < tonumber(amount) then code = 3 break end
        local devices = allocate(node, name, tonumber(amount))
        if not devices then code = 3 break end
        for _, d in ipairs(devices) do held[#held + 1] = name .. ':' .. d[1] .. ':' .. d[2] end
      end
    end
    if code == 0 then
      for name, amount in string.gmatch(requests, '([^=,]+)=(%d+)') do
        local limit = redis.call('HGET', quota, name)
        if limit and tonumber(redis.call('HGET', usage, name) or '0') + tonumber(amount) > tonumber(limit) then
          code = 4
          break
        end
      end
    end
  end
  if code == 0 then
    local tenant = string.sub(ref, 1, string.find(ref, ':', 1, true) - 1)
    if not settled[tenant] then  -- once a run: later decisions of the run are at the same time
      settle(KEYS[8], tenant, usage, now, tonumber(ARGV[5]))
      settled[tenant] = true
    end
    for name, amount in string.gmatch(requests, '([^=,]+)=(%d+)') do
      redis.call('HINCRBY', node, 'res:' .. name, amount)
      redis.call('HINCRBY', usage, name, amount)
    end
    for _, item in ipairs(held) do
      local name, id, milli = string.match(item, '^([^:]+):([^:]+):(%d+)$')
      redis.call('HINCRBY', node, 'dev:' .. name .. ':' .. id, milli)
    end
    if #held > 0 then redis.call('HSET', job, 'devs', table.concat(held, ',')) end
    if ends_hold then redis.call('HDEL', node, 'hold') end
    local attempts = tonumber(redis.call('HGET', shape, 'attempts') or '0') - tonumber(j[4] or '0') + 1
    if attempts < 1 then attempts = 1 end
    redis.call('HSET', job, 'node', node_id, 'pool', redis.call('HGET', node, 'pool'),
      'res', requests, 'attempts', attempts, 'reasons', '[]', 'placed_time', now, 'claim', claim_id)
    redis.call('HDEL', job, 'message')  -- a retried job's "waits for placement": the record now says where
    local latency = now - tonumber(j[5] or now)
    for _, le in ipairs(buckets) do
      if latency <= tonumber(le) then redis.call('HINCRBY', KEYS[5], 'placement_le:' .. le, 1) end
    end
    redis.call('HINCRBY', KEYS[5], 'placement_count', 1)
    redis.call('HINCRBY', KEYS[5], 'placement_sum_ms', latency)
    redis.call('ZADD', KEYS[6], now, string.sub(ref, 1, string.find(ref, ':', 1, true) - 1))
    redis.call('SADD', node_jobs, ref)
    redis.call('ZREM', KEYS[4], ref)
    redis.call('XADD', KEYS[2], 'MAXLEN', '~', 100000, '*', 'n', node_id)
    if redis.call('HGET', node, 'kind') == 'agent' then redis.call('ZADD', inbox, seq, ref) end
    wake_node(node, wake_flag, node_id)
  elseif code == -1 then
    code = 0
    wake_node(node, wake_flag, node_id)
  end
  if ours and (code == 0 or code == 1) then
    redis.call('ZREM', KEYS[1], ref)
    redis.call('HDEL', KEYS[7], ref)
  end
  results[#results + 1] = code
end
return {results, wake}
