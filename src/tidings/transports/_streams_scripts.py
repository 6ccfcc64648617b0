"""The Lua scripts of the Redis Streams transport: each decision is one atomic step in Redis.

- :data:`PUBLISH` adds the entries of one ``publish`` call (one round trip, nothing between).
- :data:`MOVE_DUE` moves redeliveries that fell due from the service's retry sorted set into its
  redelivery stream (``ZREM`` and ``XADD`` in one step, so a redelivery is never lost nor
  doubled between the two), and answers with the score of the next one.
- :data:`SAFE_TRIM` trims a stream below the oldest entry any consumer group still needs.

**How trimming stays safe.** An entry may go only when every group has read it *and*
acknowledged it. For each group of the stream (``XINFO GROUPS``) the first entry it still needs
is its oldest pending entry (``XPENDING`` summary) if it has one, else the entry after its
last-delivered id; the stream is trimmed (``XTRIM MINID``, exact) below the smallest of these,
and below the ``maxlen``-th newest entry, whichever is older, so that about ``maxlen`` entries
stay for late readers. A stream with no group at all is never trimmed (nobody has read it yet).
Publishing never trims (no ``MAXLEN`` on ``XADD``): producers cannot know what is pending. The
script runs atomically, so no group can read or acknowledge in between. What it cannot protect
is a group created afterwards: it starts at the oldest entry still there. Should an entry
still vanish while pending (someone ran ``XTRIM`` by hand), the consumer that reclaims it sees
it deleted and stores a dead letter saying so: the loss is reported, never silent.
"""

from __future__ import annotations

from typing import Final

__all__ = ["MOVE_DUE", "PUBLISH", "PUBLISH_CHUNK", "PUBLISH_FIELDS", "SAFE_TRIM"]

PUBLISH_CHUNK: Final = 1000
"""Most entries one :data:`PUBLISH` call adds, so that one call never holds Redis for long."""

# KEYS[i] the stream of entry i, ARGV[i] its envelope (an entry's one field). Returns how many
# entries were added.
PUBLISH: Final = """
for i, key in ipairs(KEYS) do
  redis.call('XADD', key, '*', 'envelope', ARGV[i])
end
return #KEYS
"""

# As PUBLISH, for entries with fields of their own: ARGV holds, per entry, how many field/value
# values follow, then those values.
PUBLISH_FIELDS: Final = """
local at = 1
for _, key in ipairs(KEYS) do
  local n = tonumber(ARGV[at])
  redis.call('XADD', key, '*', unpack(ARGV, at + 1, at + n))
  at = at + n + 1
end
return #KEYS
"""

# KEYS[1] retry zset, KEYS[2] redelivery stream; ARGV[1] now (s), ARGV[2] most to move.
# Each member is a JSON array of the entry's field/value pairs. Returns {moved, next score}.
MOVE_DUE: Final = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])
for _, member in ipairs(due) do
  redis.call('XADD', KEYS[2], '*', unpack(cjson.decode(member)))
  redis.call('ZREM', KEYS[1], member)
end
local following = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
return {#due, following[2] or ''}
"""

# KEYS[1] the stream; ARGV[1] how many newest entries to keep at least. Returns entries removed.
SAFE_TRIM: Final = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local function parse(id)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  return {tonumber(ms), tonumber(seq)}
end
local function older(a, b)
  return a[1] < b[1] or (a[1] == b[1] and a[2] < b[2])
end
local groups = redis.call('XINFO', 'GROUPS', KEYS[1])
if #groups == 0 then return 0 end
local keep = tonumber(ARGV[1])
local newest = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', keep)
if #newest < keep then return 0 end
local bound = parse(newest[#newest][1])
for _, group in ipairs(groups) do
  local info = {}
  for i = 1, #group, 2 do info[group[i]] = group[i + 1] end
  local pending = redis.call('XPENDING', KEYS[1], info['name'])
  local needed
  if tonumber(pending[1]) > 0 then
    needed = parse(pending[2])
  else
    needed = parse(info['last-delivered-id'])
    needed[2] = needed[2] + 1
  end
  if older(needed, bound) then bound = needed end
end
return redis.call('XTRIM', KEYS[1], 'MINID', string.format('%.0f-%.0f', bound[1], bound[2]))
"""
