-- Mark a job to be stopped. A job not yet running is then ended by the caller
-- (finish.lua); a running one by its node agent, which watches this flag.
--
-- KEYS: 1 job
-- Returns the job's status before the request, or false if there is no such job.
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return false end
if status == 'PENDING' or status == 'RUNNING' then
  redis.call('HSET', KEYS[1], 'stop', '1')
end
return status
