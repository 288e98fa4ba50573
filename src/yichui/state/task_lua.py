"""Lua scripts of the task engine: every state change of a task is one atomic script.

All scripts that act on one task share the key layout built by ``TaskStore._task_keys``::

    KEYS[1] task_status   KEYS[2] task_log   KEYS[3] task_queue (stream)
    KEYS[4] task_running  KEYS[5] task_delayed
    KEYS[6..11] task_index for queued, running, succeeded, failed, cancelled, dead
    ARGV[1] task id  ARGV[2] events channel  ARGV[3] log cap  ARGV[4] consumer group

Every key carries the ``{tasks}`` hash tag, so each script stays in one Redis Cluster slot.
Times come from the Redis clock (``TIME``), so leases mean the same on every worker host.
A task's ``token`` (written when a worker claims it) fences every later write: a worker whose
lease was taken away cannot report, finish, acknowledge or hand back the task any more.
"""

from __future__ import annotations

_PRELUDE = """
local id, channel, log_max, group = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4]
local status, log, queue, running, delayed = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local index = {queued = KEYS[6], running = KEYS[7], succeeded = KEYS[8], failed = KEYS[9],
               cancelled = KEYS[10], dead = KEYS[11]}
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)

local function emit(kind, data)
  redis.call('XADD', log, 'MAXLEN', '~', log_max, '*', 'k', kind, 'd', data)
end

local function set_state(new, extra)
  local old = redis.call('HGET', status, 'state')
  if old and index[old] then redis.call('ZREM', index[old], id) end
  redis.call('ZADD', index[new], now, id)
  redis.call('HSET', status, 'state', new, 'updated', now)
  local ev = {event = 'state', id = id, state = new, type = redis.call('HGET', status, 'type'),
              attempt = tonumber(redis.call('HGET', status, 'attempt') or '0'), ts = now / 1000,
              tenant = redis.call('HGET', status, 'tenant') or nil}
  if extra then for k, v in pairs(extra) do ev[k] = v end end
  local payload = cjson.encode(ev)
  emit('state', payload)
  redis.call('PUBLISH', channel, payload)
end

local function push()
  local msg = redis.call('XADD', queue, '*', 'id', id)
  redis.call('HSET', status, 'msg', msg)
  return msg
end

local function drop(msg)
  redis.call('XACK', queue, group, msg)
  redis.call('XDEL', queue, msg)
end

local function drop_current()
  local msg = redis.call('HGET', status, 'msg')
  if msg then drop(msg); redis.call('HDEL', status, 'msg') end
end

-- a terminal state: ack the delivery, forget the lease, expire status and log after ttl_ms
local function finish(new, ttl_ms, keep_ms, extra)
  drop_current()
  redis.call('ZREM', running, id)
  redis.call('ZREM', delayed, id)
  redis.call('HDEL', status, 'token', 'cancel', 'retry_at')
  redis.call('HSET', status, 'finished', now)
  set_state(new, extra)
  redis.call('PEXPIRE', status, ttl_ms)
  redis.call('PEXPIRE', log, ttl_ms)
  -- index entries older than any finished status can live: their status is gone
  redis.call('ZREMRANGEBYSCORE', index[new], '-inf', now - keep_ms)
end

-- the run is over (handed back, or its worker lost): forget its delivery, lease and token;
-- a pending cancel then ends the task -> true when it did
local function end_run(ttl_ms, keep_ms)
  drop_current()
  redis.call('ZREM', running, id)
  redis.call('HDEL', status, 'token')
  if redis.call('HEXISTS', status, 'cancel') == 0 then return false end
  redis.call('HSET', status, 'error', cjson.encode({type = 'Cancelled', message = 'cancelled'}))
  finish('cancelled', ttl_ms, keep_ms)
  return true
end
"""

# ARGV[5] type, [6] args JSON, [7] queue name, [8] max attempts, [9] delay ms, [10] tenant
# -> {1} created, or {0, type, args} of the task that already has this id
ENQUEUE = (
    _PRELUDE
    + """
if redis.call('EXISTS', status) == 1 then
  return {0, redis.call('HGET', status, 'type') or '', redis.call('HGET', status, 'args') or ''}
end
-- HSET first: Redis refuses a script's first write that may grow memory when maxmemory is
-- reached (OOM), but once a script has written anything (a DEL) it lets every later write in
redis.call('HSET', status, 'id', id, 'type', ARGV[5], 'args', ARGV[6], 'queue', ARGV[7],
           'attempt', 0, 'max_attempts', ARGV[8], 'created', now, 'tenant', ARGV[10])
redis.call('DEL', log)
set_state('queued')
local delay = tonumber(ARGV[9])
if delay > 0 then
  redis.call('ZADD', delayed, now + delay, id)
  redis.call('HSET', status, 'retry_at', now + delay)
else
  push()
end
return {1}
"""
)

# ARGV[5] stream entry id, [6] worker id, [7] new token, [8] lease ms
# -> {1, attempt, type, args, checkpoint, max_attempts, fence} or {0, state}
CLAIM = (
    _PRELUDE
    + """
local state = redis.call('HGET', status, 'state')
local current = redis.call('HGET', status, 'msg')
if state ~= 'queued' or current ~= ARGV[5] then
  -- a stale delivery (cancelled, finished, expired or superseded): drop it, never run it
  if not (state == 'running' and current == ARGV[5]) then drop(ARGV[5]) end
  return {0, state or 'missing'}
end
local attempt = redis.call('HINCRBY', status, 'attempt', 1)
local fence = redis.call('HINCRBY', status, 'fence', 1)
redis.call('HSET', status, 'token', ARGV[7], 'worker', ARGV[6], 'started', now, 'heartbeat', now)
redis.call('HDEL', status, 'retry_at')
redis.call('ZADD', running, now + tonumber(ARGV[8]), id)
set_state('running', {worker = ARGV[6]})
return {1, attempt, redis.call('HGET', status, 'type'), redis.call('HGET', status, 'args'),
        redis.call('HGET', status, 'checkpoint') or '',
        tonumber(redis.call('HGET', status, 'max_attempts')), fence}
"""
)

# ARGV[5] token, [6] progress JSON or '', [7] checkpoint JSON or '', [8…] log entries (JSON)
# -> 0 lease lost, 1 ok, 2 ok and a cancel was requested
REPORT = (
    _PRELUDE
    + """
if redis.call('HGET', status, 'token') ~= ARGV[5] then return 0 end
for i = 8, #ARGV do emit('log', ARGV[i]) end
if ARGV[6] ~= '' then
  redis.call('HSET', status, 'progress', ARGV[6], 'updated', now)
  emit('progress', ARGV[6])
  -- watchers (the dashboard's feed) hear of progress too, at most every progress_interval
  redis.call('PUBLISH', channel, '{"event":"progress","id":' .. cjson.encode(id) ..
             ',"type":' .. cjson.encode(redis.call('HGET', status, 'type') or '') ..
             ',"tenant":' .. cjson.encode(redis.call('HGET', status, 'tenant') or 'local') ..
             ',"progress":' .. ARGV[6] .. '}')
end
if ARGV[7] ~= '' then redis.call('HSET', status, 'checkpoint', ARGV[7]) end
if redis.call('HEXISTS', status, 'cancel') == 1 then return 2 end
return 1
"""
)

# ARGV[5] token, [6] outcome (succeeded|failed|cancelled|dead|retry), [7] result or error JSON,
# [8] ttl ms, [9] keep ms, [10] retry delay ms, [11] final progress JSON or ''
# A failure after a cancel request ends the task cancelled. -> 0 lease lost, 1 written
FINISH = (
    _PRELUDE
    + """
if redis.call('HGET', status, 'token') ~= ARGV[5] then return 0 end
if ARGV[11] ~= '' then
  redis.call('HSET', status, 'progress', ARGV[11])
  emit('progress', ARGV[11])
end
local outcome = ARGV[6]
local payload = ARGV[7]
if outcome ~= 'succeeded' and redis.call('HEXISTS', status, 'cancel') == 1 then
  -- a cancel was asked for while it ran: it ends cancelled, not retried or dead-lettered
  outcome = 'cancelled'
  payload = cjson.encode({type = 'Cancelled', message = 'cancelled by user'})
end
if outcome ~= 'succeeded' and outcome ~= 'cancelled' then
  local ok, err = pcall(cjson.decode, payload)
  local text = ok and ((err.type or '?') .. ': ' .. (err.message or '')) or payload
  local attempt = redis.call('HGET', status, 'attempt') or '?'
  emit('log', cjson.encode({ts = now / 1000, level = 'error',
                            line = 'attempt ' .. attempt .. ' failed: ' .. text}))
end
if outcome == 'retry' then
  drop_current()
  redis.call('ZREM', running, id)
  redis.call('HDEL', status, 'token')
  local due = now + tonumber(ARGV[10])
  redis.call('HSET', status, 'last_error', payload, 'retry_at', due)
  redis.call('ZADD', delayed, due, id)
  set_state('queued', {retry_at = due / 1000})
  return 1
end
if outcome == 'succeeded' then
  redis.call('HSET', status, 'result', payload)
else
  redis.call('HSET', status, 'error', payload)
end
finish(outcome, tonumber(ARGV[8]), tonumber(ARGV[9]))
return 1
"""
)

# ARGV[5] token, [6] ttl ms, [7] keep ms: a worker shutting down hands its task back at once;
# the hand-back does not count as an attempt. -> 0 lease lost, 1 requeued, 2 cancelled
RELEASE = (
    _PRELUDE
    + """
if redis.call('HGET', status, 'token') ~= ARGV[5] then return 0 end
redis.call('HINCRBY', status, 'attempt', -1)
if end_run(tonumber(ARGV[6]), tonumber(ARGV[7])) then return 2 end
set_state('queued', {reason = 'handed back by a worker shutting down'})
push()
return 1
"""
)

# ARGV[5] ttl ms, [6] keep ms: the lease of a running task lapsed (its worker died or stalled).
# -> 0 nothing to do, 1 requeued, 2 cancelled, 3 dead
EXPIRE_LEASE = (
    _PRELUDE
    + """
local deadline = redis.call('ZSCORE', running, id)
if not deadline or tonumber(deadline) > now then return 0 end
if redis.call('HGET', status, 'state') ~= 'running' then
  redis.call('ZREM', running, id)
  return 0
end
local worker = redis.call('HGET', status, 'worker') or '?'
local ttl, keep = tonumber(ARGV[5]), tonumber(ARGV[6])
if end_run(ttl, keep) then return 2 end
local attempt = tonumber(redis.call('HGET', status, 'attempt') or '0')
local max = tonumber(redis.call('HGET', status, 'max_attempts') or '1')
local err = {type = 'WorkerLost', message = 'worker ' .. worker ..
             ' stopped renewing its lease (attempt ' .. attempt .. ')'}
if attempt >= max then
  err.message = 'gave up after ' .. attempt .. ' attempts; last: ' .. err.message
  redis.call('HSET', status, 'error', cjson.encode(err))
  finish('dead', ttl, keep)
  return 3
end
redis.call('HSET', status, 'last_error', cjson.encode(err))
set_state('queued', {reason = 'lease expired'})
push()
return 1
"""
)

# a retry whose backoff is over goes onto the queue stream -> 1 promoted, 0 not due / gone
PROMOTE = (
    _PRELUDE
    + """
local due = redis.call('ZSCORE', delayed, id)
if not due or tonumber(due) > now then return 0 end
redis.call('ZREM', delayed, id)
if redis.call('HGET', status, 'state') ~= 'queued' then return 0 end
redis.call('HDEL', status, 'retry_at')
push()
return 1
"""
)

# ARGV[5] stream entry id: a delivery read by a consumer that died before claiming it.
# -> 1 redelivered, 0 left alone (its task runs), 2 dropped (stale)
ORPHAN = (
    _PRELUDE
    + """
local state = redis.call('HGET', status, 'state')
local current = redis.call('HGET', status, 'msg')
if current == ARGV[5] and state == 'running' then return 0 end
drop(ARGV[5])
if current == ARGV[5] and state == 'queued' then
  push()
  return 1
end
return 2
"""
)

# ARGV[5] ttl ms, [6] keep ms, [7] reason -> {outcome, state}: outcome is cancelled (it was
# queued), requested (running: the worker is told on its next heartbeat or report), unchanged
CANCEL = (
    _PRELUDE
    + """
local state = redis.call('HGET', status, 'state')
if not state then return {'missing', 'missing'} end
if state == 'queued' then
  redis.call('HSET', status, 'error', cjson.encode({type = 'Cancelled', message = ARGV[7]}))
  finish('cancelled', tonumber(ARGV[5]), tonumber(ARGV[6]))
  return {'cancelled', 'cancelled'}
end
if state == 'running' then
  if redis.call('HEXISTS', status, 'cancel') == 0 then
    redis.call('HSET', status, 'cancel', now)
    emit('log', cjson.encode({ts = now / 1000, level = 'warning', line = 'cancel requested'}))
  end
  return {'requested', state}
end
return {'unchanged', state}
"""
)

# ARGV[5] max attempts or '': run a failed, dead or cancelled task again with a fresh budget
# -> {1} requeued or {0, state}
RETRY = (
    _PRELUDE
    + """
local state = redis.call('HGET', status, 'state')
if state ~= 'failed' and state ~= 'dead' and state ~= 'cancelled' then
  return {0, state or 'missing'}
end
redis.call('PERSIST', status)
redis.call('PERSIST', log)
redis.call('HDEL', status, 'error', 'finished', 'result', 'cancel', 'retry_at', 'worker')
redis.call('HSET', status, 'attempt', 0)
if ARGV[5] ~= '' then redis.call('HSET', status, 'max_attempts', ARGV[5]) end
set_state('queued', {reason = 'retried'})
push()
return {1}
"""
)

# Standalone layouts below.

# KEYS[1] running, KEYS[2] delayed; ARGV[1] limit -> {lapsed ids, due ids}
DUE = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local n = tonumber(ARGV[1])
return {redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, n),
        redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, n)}
"""

# KEYS[1] running, [2] queue stream, [3] workers hash, [3+j] status of task j;
# ARGV[1] group, [2] worker id, [3] lease ms, [4] worker JSON, then id, token per task.
# Renews every lease this worker still holds -> per task 0 lost, 1 ok, 2 cancel requested
HEARTBEAT = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local lease = tonumber(ARGV[3])
local out = {}
for j = 1, #KEYS - 3 do
  local st, id, token = KEYS[3 + j], ARGV[3 + 2 * j], ARGV[4 + 2 * j]
  if redis.call('HGET', st, 'token') == token then
    redis.call('ZADD', KEYS[1], now + lease, id)
    redis.call('HSET', st, 'heartbeat', now)
    local msg = redis.call('HGET', st, 'msg')
    -- keep the delivery owned by us and fresh, so orphan recovery never touches it
    if msg then redis.call('XCLAIM', KEYS[2], ARGV[1], ARGV[2], 0, msg, 'JUSTID') end
    if redis.call('HEXISTS', st, 'cancel') == 1 then out[j] = 2 else out[j] = 1 end
  else
    out[j] = 0
  end
end
local info = cjson.decode(ARGV[4])
info.heartbeat = now
redis.call('HSET', KEYS[3], ARGV[2], cjson.encode(info))
return out
"""

# KEYS[1] queue stream, KEYS[2] delayed; ARGV[1] group -> tasks of this queue waiting for a
# worker: entries not yet delivered (acked ones are deleted) plus retries in backoff
BACKLOG = """
local len = redis.call('XLEN', KEYS[1])
local pending = 0
if len > 0 then
  local ok, summary = pcall(redis.call, 'XPENDING', KEYS[1], ARGV[1])
  if ok then pending = tonumber(summary[1]) end
end
return len - pending + redis.call('ZCARD', KEYS[2])
"""
