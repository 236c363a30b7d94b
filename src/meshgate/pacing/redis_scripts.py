"""The Lua scripts of `RedisStore`: one per operation, so each is atomic in Redis.

Time is Redis's own (`TIME`), so every gateway sharing the Redis agrees on it. Keys, under a
prefix P (ARGV[1]):
- P b:<key>                token bucket: hash {t: tokens, ts: time}; expires once full again;
- P w:<start>:<budget>     budget window: hash {budget, start, end, limit, spent, reserved};
                           expires `margin` after the window ends;
- P r:<id>                 reservation: hash {state: held|settled|refused, answer, charges};
                           expires with its ttl (refused), or `margin` after it (held, settled:
                           held ones are charged by the sweep long before that);
- P exp                    sorted set: held reservation ids by expiry time;
- P idx                    sorted set: window keys by window end (for listing; trimmed by
                           reserve and budgets).
Both sets expire with the last key they index, so an idle prefix leaves nothing behind.
Scripts build keys from the prefix (not KEYS[]), so they need a standalone Redis (or a cluster
whose keys all hash to one slot: give the prefix a hash tag, e.g. "{meshgate}:").

Fractions travel as strings: Redis turns a Lua number reply into an integer.
"""

from __future__ import annotations

# Every budget script first charges in full up to SWEEP reservations whose ttl has passed.
# Admission decisions do not depend on the sweep (an expired reservation counts as spent
# or reserved, the same total), only the spent/reserved split does, so a bound is safe.
_PRELUDE = """
local P = ARGV[1]
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000

-- a set that indexes other keys lives as long as the longest-lived key it indexes
local function outlive(key, at)
  local left = redis.call('PTTL', key)
  if left < 0 or now + left / 1000 < at then
    redis.call('PEXPIREAT', key, math.ceil(at * 1000))
  end
end

local function sweep()
  local ids = redis.call('ZRANGEBYSCORE', P .. 'exp', '-inf', now, 'LIMIT', 0, 64)
  for _, id in ipairs(ids) do
    local rk = P .. 'r:' .. id
    local held = redis.call('HMGET', rk, 'state', 'charges')
    if held[1] == 'held' then
      for _, c in ipairs(cjson.decode(held[2])) do
        if redis.call('EXISTS', c[1]) == 1 then
          redis.call('HINCRBY', c[1], 'reserved', string.format('%d', -c[2]))
          redis.call('HINCRBY', c[1], 'spent', string.format('%d', c[2]))
        end
      end
    end
    redis.call('DEL', rk)
    redis.call('ZREM', P .. 'exp', id)
  end
end
"""

# ARGV: P, key, requests, per_seconds, want -> {granted, remaining, reset_s as a string}
HIT = """
local P = ARGV[1]
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local k = P .. 'b:' .. ARGV[2]
local cap = tonumber(ARGV[3])
local per = tonumber(ARGV[4])
local rate = cap / per
local v = redis.call('HMGET', k, 't', 'ts')
local tokens = cap
if v[1] then
  tokens = math.min(cap, tonumber(v[1]) + math.max(0, now - tonumber(v[2])) * rate)
end
local granted = math.min(tonumber(ARGV[5]), math.floor(tokens + 1e-9))
local reset
if granted >= 1 then
  tokens = math.max(0, tokens - granted)
  reset = (cap - tokens) / rate
else
  reset = (1 - tokens) / rate
end
redis.call('HSET', k, 't', string.format('%.17g', tokens), 'ts', string.format('%.17g', now))
redis.call('PEXPIRE', k, math.ceil((cap - tokens) / rate * 1000) + 1000)
return {granted, math.floor(tokens + 1e-9), string.format('%.6f', reset)}
"""

# ARGV: P, id, ttl_s, margin_s, charges JSON [[budget, limit, amount, start, end], ...]
# (one per counter) -> the answer JSON {a: admitted, f: refused budget or false,
# s: [[budget, start, end, limit, spent, reserved], ...]}; the first answer when replayed.
RESERVE = (
    _PRELUDE
    + """
sweep()
local margin = tonumber(ARGV[4])
redis.call('ZREMRANGEBYSCORE', P .. 'idx', '-inf', now - margin)
local rk = P .. 'r:' .. ARGV[2]
local prev = redis.call('HGET', rk, 'answer')
if prev then return prev end
local ttl = tonumber(ARGV[3])
local charges = cjson.decode(ARGV[5])
local refused = false
local used = {}
for i, c in ipairs(charges) do
  local wk = P .. 'w:' .. string.format('%d', c[4]) .. ':' .. c[1]
  local v = redis.call('HMGET', wk, 'spent', 'reserved')
  local spent = tonumber(v[1] or '0')
  local reserved = tonumber(v[2] or '0')
  used[i] = {wk, spent, reserved}
  if not refused and spent + reserved + c[3] > c[2] then refused = c[1] end
end
local states = {}
local held = {}
for i, c in ipairs(charges) do
  local wk, spent, reserved = used[i][1], used[i][2], used[i][3]
  if not refused then
    redis.call('HSET', wk, 'budget', c[1], 'start', string.format('%d', c[4]),
      'end', string.format('%d', c[5]), 'limit', string.format('%d', c[2]))
    reserved = redis.call('HINCRBY', wk, 'reserved', string.format('%d', c[3]))
    redis.call('HSETNX', wk, 'spent', '0')
    redis.call('EXPIREAT', wk, math.ceil(c[5] + margin))
    redis.call('ZADD', P .. 'idx', c[5], wk)
    outlive(P .. 'idx', c[5] + margin)
    held[#held + 1] = {wk, c[3], c[1]}
  end
  states[i] = {c[1], c[4], c[5], c[2], spent, reserved}
end
local answer = cjson.encode({a = not refused, f = refused, s = states})
if refused then
  redis.call('HSET', rk, 'state', 'refused', 'answer', answer)
  redis.call('PEXPIRE', rk, math.ceil(ttl * 1000))
else
  redis.call('HSET', rk, 'state', 'held', 'answer', answer, 'charges', cjson.encode(held))
  redis.call('PEXPIRE', rk, math.ceil((ttl + margin) * 1000))
  redis.call('ZADD', P .. 'exp', string.format('%.6f', now + ttl), ARGV[2])
  outlive(P .. 'exp', now + ttl + margin)
end
return answer
"""
)

# ARGV: P, id, actual JSON {budget: amount} -> 1 if this call settled it, else 0
SETTLE = (
    _PRELUDE
    + """
sweep()
local rk = P .. 'r:' .. ARGV[2]
local held = redis.call('HMGET', rk, 'state', 'charges')
if held[1] ~= 'held' then return 0 end
local actual = cjson.decode(ARGV[3])
for _, c in ipairs(cjson.decode(held[2])) do
  if redis.call('EXISTS', c[1]) == 1 then
    local amount = actual[c[3]]
    if amount == nil then amount = c[2] end
    redis.call('HINCRBY', c[1], 'reserved', string.format('%d', -c[2]))
    redis.call('HINCRBY', c[1], 'spent', string.format('%d', amount))
  end
end
redis.call('HSET', rk, 'state', 'settled')
redis.call('HDEL', rk, 'charges')
redis.call('ZREM', P .. 'exp', ARGV[2])
return 1
"""
)

# ARGV: P, margin_s, budget prefix -> JSON [[budget, start, end, limit, spent, reserved], ...]
BUDGETS = (
    _PRELUDE
    + """
sweep()
local idx = P .. 'idx'
redis.call('ZREMRANGEBYSCORE', idx, '-inf', now - tonumber(ARGV[2]))
local prefix = ARGV[3]
local out = {}
for _, wk in ipairs(redis.call('ZRANGEBYSCORE', idx, '(' .. now, '+inf')) do
  local v = redis.call('HMGET', wk, 'budget', 'start', 'end', 'limit', 'spent', 'reserved')
  if v[1] and string.sub(v[1], 1, #prefix) == prefix and tonumber(v[2]) <= now then
    out[#out + 1] = {v[1], tonumber(v[2]), tonumber(v[3]), tonumber(v[4]),
      tonumber(v[5] or '0'), tonumber(v[6] or '0')}
  end
end
return cjson.encode(out)
"""
)
