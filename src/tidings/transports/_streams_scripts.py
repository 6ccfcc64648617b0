"""The Lua scripts of the Redis Streams transport: each decision is one atomic step in Redis.

- :data:`PUBLISH` adds the entries of one ``publish`` call (one round trip, nothing between).
- :data:`MOVE_DUE` moves redeliveries that fell due from the service's retry sorted set into its
  redelivery stream (``ZREM`` and ``XADD`` in one step, so a redelivery is never lost nor
  doubled between the two), and answers with the score of the next one. A member it cannot
  move (written by someone else, or refused by ``XADD``) goes to a list of its own, which
  consumers dead-letter: it never fails the move of the others.
- :data:`SAFE_TRIM` trims a stream below the oldest entry any consumer group still needs.

**How trimming stays safe.** An entry may go only when every group has read it *and*
acknowledged it. For each group of the stream (``XINFO GROUPS``) the first entry it still needs
is its oldest pending entry (``XPENDING`` summary) if it has one, else the entry after its
last-delivered id; the stream is trimmed (``XTRIM MINID``, exact) below the smallest of these,
and below the ``maxlen``-th newest entry, whichever is older, so that at least ``maxlen``
entries stay for late readers. It costs what it removes (a stream within ``maxlen`` costs one
``XLEN``), at most :data:`TRIM_MOST` entries a call. A stream with no group at all is never
trimmed (nobody has read it yet).
Publishing never trims (no ``MAXLEN`` on ``XADD``): producers cannot know what is pending. The
script runs atomically, so no group can read or acknowledge in between. What it cannot protect
is a group created afterwards: it starts at the oldest entry still there. Should an entry
still vanish while pending (someone ran ``XTRIM`` by hand), the consumer that reclaims it sees
it deleted and stores a dead letter saying so: the loss is reported, never silent.
"""

from __future__ import annotations

from typing import Final

__all__ = [
    "MOVE_DUE",
    "MOVE_LONGEST",
    "MOVE_MOST_VALUES",
    "PUBLISH",
    "PUBLISH_CHUNK",
    "PUBLISH_FIELDS",
    "SAFE_TRIM",
]

TRIM_MOST: Final = 10_000
"""Most entries one :data:`SAFE_TRIM` call removes, so that one call never holds Redis long."""

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

MOVE_MOST_VALUES: Final = 64
"""Most field and value strings one redelivery may hold; tidings writes at most 20."""

MOVE_LONGEST: Final = 4 * 1024 * 1024
"""Longest redelivery member, in bytes, the mover decodes (an envelope is at most 1 MiB)."""

# KEYS[1] retry zset, KEYS[2] redelivery stream, KEYS[3] the list of unmovable members;
# ARGV[1] now (s), ARGV[2] most to move, ARGV[3] most values per member, ARGV[4] longest member.
# Each member is a JSON array of the entry's field/value strings. A member that is not one (not
# JSON, not a flat array of an even number of strings, too long, too many values) or that XADD
# refuses is moved to KEYS[3] instead, for a consumer to dead-letter: one bad member never fails
# the script, so it never stops the others. Returns {moved, next score, unmovable}.
MOVE_DUE: Final = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])
local most, longest, unmovable = tonumber(ARGV[3]), tonumber(ARGV[4]), 0
for _, member in ipairs(due) do
  local ok, fields = false, nil
  if #member <= longest then ok, fields = pcall(cjson.decode, member) end
  local movable = ok and type(fields) == 'table' and #fields >= 2 and #fields <= most
    and #fields % 2 == 0
  if movable then
    for i = 1, #fields do
      if type(fields[i]) ~= 'string' then movable = false break end
    end
  end
  if movable then
    local added = redis.pcall('XADD', KEYS[2], '*', unpack(fields))
    movable = type(added) ~= 'table' or not added['err']
  end
  if not movable then
    redis.call('RPUSH', KEYS[3], member)
    unmovable = unmovable + 1
  end
  redis.call('ZREM', KEYS[1], member)
end
local following = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
return {#due, following[2] or '', unmovable}
"""

# KEYS[1] the stream; ARGV[1] how many newest entries to keep at least, ARGV[2] most entries to
# remove in one call. Returns entries removed. Costs O(groups + removed): what it reads of the
# stream are the entries it removes.
SAFE_TRIM: Final = """
local keep, most = tonumber(ARGV[1]), tonumber(ARGV[2])
local excess = redis.call('XLEN', KEYS[1]) - keep
if excess <= 0 then return 0 end
local function parse(id)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  return {tonumber(ms), tonumber(seq)}
end
local function older(a, b)
  return a[1] < b[1] or (a[1] == b[1] and a[2] < b[2])
end
local groups = redis.call('XINFO', 'GROUPS', KEYS[1])
if #groups == 0 then return 0 end
local bound
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
  if bound == nil or older(needed, bound) then bound = needed end
end
local below = string.format('(%.0f-%.0f', bound[1], bound[2])
local doomed = redis.call('XRANGE', KEYS[1], '-', below, 'COUNT', math.min(excess, most))
if #doomed == 0 then return 0 end
local last = parse(doomed[#doomed][1])
return redis.call('XTRIM', KEYS[1], 'MINID', string.format('%.0f-%.0f', last[1], last[2] + 1))
"""
