-- The tenant's change feed (docs/api.md, "Following changes"): a capped stream,
-- poolq:tenant:<t>:changes, with an entry for each change of a job's status or node,
-- written by the step that makes the change, so that a reader never misses one and never
-- sees one before it happened. An entry's id is its time; its fields: id (the submission
-- id), s (the status: PENDING … STOPPED, ARRAY for an array's record, DELETED once the
-- record is gone) and n (the node, '' none). The oldest entries beyond CHANGES_KEPT go.
--
-- The stream's key is built from any of the tenant's own keys the step was given
-- (poolq:tenant:<t>:<what>): its last part becomes "changes".
local CHANGES_KEPT = 100000
local function job_changed(tenant_key, ref, status, node)
  local stream = string.match(tenant_key, '^(.*:)[^:]*$') .. 'changes'
  local id = string.sub(ref, string.find(ref, ':', 1, true) + 1)
  redis.call('XADD', stream, 'MAXLEN', '~', CHANGES_KEPT, '*', 'id', id, 's', status, 'n', node or '')
end
