-- Fair share (docs/scheduling.md): a tenant's decayed CPU use, kept exactly as of the last
-- change of what it holds ("<tenant>" and "<tenant>@" in poolq:fairshare).
-- Its use brought up to now (decayed, plus what it held since), and what it holds now.
local function fair_share_use(fairshare, tenant, usage, now, half_life)
  local f = redis.call('HMGET', fairshare, tenant, tenant .. '@')
  local dt = math.max(now - tonumber(f[2] or now), 0)
  local holds = tonumber(redis.call('HGET', usage, 'CPU') or '0')
  return tonumber(f[1] or '0') * 2 ^ (-dt / half_life) + holds * dt / 1000, holds
end
-- Before what a tenant holds changes: charge what it held since, and restart from now.
local function settle(fairshare, tenant, usage, now, half_life)
  local used = fair_share_use(fairshare, tenant, usage, now, half_life)
  redis.call('HSET', fairshare, tenant, string.format('%.1f', used), tenant .. '@', now)
end
