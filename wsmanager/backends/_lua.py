"""Lua scripts of the Redis backplane: every change to cluster capacity and
presence is one of these, so that each is atomic in Redis.

Every script takes the same five keys and four leading arguments::

    KEYS[1] total      string: reserved + connected connections, cluster-wide
    KEYS[2] lobbies    hash:   lobby -> reserved + connected memberships
    KEYS[3] users      hash:   user  -> reserved + connected connections
    KEYS[4] nodes      zset:   node id -> lease expiry (ms, Redis clock)
    KEYS[5] node       hash:   this node's connections: cid -> [user, state, lobby, ...]
    ARGV[1] channel    the bus every node subscribes to
    ARGV[2] node id
    ARGV[3] lease      milliseconds
    ARGV[4] prefix     of the per-node hashes (prefix .. node id)

``state`` is 0 for a reservation (handshake in progress), 1 once connected.
The lobbies of an entry are its memberships (rooms): the lobby of
``connect()`` first, then those joined (JOIN), minus those left (PART); a
connection may be in none. ``lobbies`` counts memberships, so
``max_per_lobby`` holds for connects and joins alike; a reaped node's
memberships go with its hash. Connected entries (state 1) are also counted
where a process that holds no connection reads them
(:class:`wsmanager.backends.redis.Publisher`), under the namespace's prefix
(``ARGV[4]`` without its trailing ``node:``)::

    <prefix>online      hash: user -> connected connections, cluster-wide
    <prefix>lu:<lobby>  hash: user -> connected memberships in that lobby
Presence events go on the bus as ``"C" .. json``: ``["j", node, cid, user,
lobby, ...]`` (connected, with its lobbies), ``["m", node, cid, lobby]``
(joined a lobby), ``["p", node, cid, lobby]`` (left a lobby), ``["l", node,
[cid, ...]]`` (disconnected), ``["s", node, [cid, user, n, lobby * n,
...]]`` (the node's full list, after a resync) and ``["g", node]`` (node
gone: its lease expired, or it shut down).

Redis' own clock (TIME) decides leases, so nodes need no synchronised clocks.
Standalone Redis (or Sentinel) only: reaping touches keys of other nodes.
"""

from __future__ import annotations

_COMMON = """
local K = KEYS
local chan, node, lease = ARGV[1], ARGV[2], tonumber(ARGV[3])
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function hdec(key, field)
  if redis.call('HINCRBY', key, field, -1) <= 0 then redis.call('HDEL', key, field) end
end
-- t: an entry {user, state, lobby, ...}
local function unaccount(t)
  if redis.call('DECR', K[1]) <= 0 then redis.call('DEL', K[1]) end
  hdec(K[3], t[1])
  for i = 3, #t do hdec(K[2], t[i]) end
end
local function account(t)
  redis.call('INCR', K[1])
  redis.call('HINCRBY', K[3], t[1], 1)
  for i = 3, #t do redis.call('HINCRBY', K[2], t[i], 1) end
end
local function event(t) redis.call('PUBLISH', chan, 'C' .. cjson.encode(t)) end
local base = string.sub(ARGV[4], 1, -6)
-- membership of a connected (state 1) user in lobby appears (d = 1) or goes (d = -1) for readers
local function online_in(lobby, user, d)
  if d > 0 then
    redis.call('HINCRBY', base .. 'lu:' .. lobby, user, 1)
  else
    hdec(base .. 'lu:' .. lobby, user)
  end
end
-- a connected entry appears (d = 1) or goes (d = -1) for readers
local function online(t, d)
  if t[2] ~= 1 then return end
  if d > 0 then
    redis.call('HINCRBY', base .. 'online', t[1], 1)
  else
    hdec(base .. 'online', t[1])
  end
  for i = 3, #t do online_in(t[i], t[1], d) end
end
-- release this node's cids ARGV[first..]; publish "left" for the connected ones
local function release_from(first)
  local gone = {}
  for i = first, #ARGV do
    local cid = ARGV[i]
    local e = redis.call('HGET', K[5], cid)
    if e then
      local t = cjson.decode(e)
      unaccount(t)
      online(t, -1)
      redis.call('HDEL', K[5], cid)
      if t[2] == 1 then gone[#gone + 1] = cid end
    end
  end
  if #gone > 0 then event({'l', node, gone}) end
  return #gone
end
-- drop every connection of a node hash; publish "gone"
local function drop_node(n, h)
  local have = redis.call('HGETALL', h)
  for j = 2, #have, 2 do
    local t = cjson.decode(have[j])
    unaccount(t)
    online(t, -1)
  end
  redis.call('DEL', h)
  redis.call('ZREM', K[4], n)
  event({'g', n})
end
"""

# ARGV[5..10]: cid, lobby, user, max_connections, max_per_lobby, max_per_user (-1: none)
# ARGV[11..]: cids of this node released but maybe not yet in Redis (queued RELEASEs):
#   released first, so that a connection this node just removed (the "replace"
#   policy, a quick reconnect) no longer counts against the new one
# -> "" (reserved) | "server_full" | "lobby_full" | "user_limit" | "lost" (node unknown: resync)
RESERVE = (
    _COMMON
    + """
if not redis.call('ZSCORE', K[4], node) then return 'lost' end
release_from(11)
local cid, lobby, user = ARGV[5], ARGV[6], ARGV[7]
if redis.call('HEXISTS', K[5], cid) == 1 then return '' end
if tonumber(redis.call('GET', K[1]) or '0') >= tonumber(ARGV[8]) then return 'server_full' end
if tonumber(redis.call('HGET', K[2], lobby) or '0') >= tonumber(ARGV[9]) then return 'lobby_full' end
local max_user = tonumber(ARGV[10])
if max_user >= 0 and tonumber(redis.call('HGET', K[3], user) or '0') >= max_user then
  return 'user_limit'
end
account({user, 0, lobby})
redis.call('HSET', K[5], cid, cjson.encode({user, 0, lobby}))
return ''
"""
)

# ARGV[5]: cid -> 1 (connected) | 0 (no such reservation: the node must resync)
COMMIT = (
    _COMMON
    + """
local cid = ARGV[5]
local e = redis.call('HGET', K[5], cid)
if not e then return 0 end
local t = cjson.decode(e)
if t[2] ~= 1 then
  t[2] = 1
  online(t, 1)
  redis.call('HSET', K[5], cid, cjson.encode(t))
  local ev = {'j', node, cid, t[1]}
  for i = 3, #t do ev[#ev + 1] = t[i] end
  event(ev)
end
return 1
"""
)

# ARGV[5..]: cids -> how many were connected (reservations are released silently)
RELEASE = (
    _COMMON
    + """
return release_from(5)
"""
)

# ARGV[5..]: per connection cid, user, state, n, then its n lobbies: the
# node's whole truth. Registers the node (lease), makes its hash equal to the
# list (accounting the difference, without limit checks: these connections
# and memberships exist), publishes "s".
SYNC = (
    _COMMON
    + """
redis.call('ZADD', K[4], now_ms() + lease, node)
local want = {}
local i = 5
while i <= #ARGV do
  want[ARGV[i]] = true
  i = i + 4 + tonumber(ARGV[i + 3])
end
local have = redis.call('HGETALL', K[5])
for j = 1, #have, 2 do
  local t = cjson.decode(have[j + 1])
  unaccount(t)
  online(t, -1)
  if not want[have[j]] then redis.call('HDEL', K[5], have[j]) end
end
local flat = {}
local conns = 0
i = 5
while i <= #ARGV do
  local cid, n = ARGV[i], tonumber(ARGV[i + 3])
  local t = {ARGV[i + 1], tonumber(ARGV[i + 2])}
  for k = 1, n do t[#t + 1] = ARGV[i + 3 + k] end
  account(t)
  online(t, 1)
  redis.call('HSET', K[5], cid, cjson.encode(t))
  if t[2] == 1 then
    conns = conns + 1
    flat[#flat + 1] = cid; flat[#flat + 1] = t[1]; flat[#flat + 1] = n
    for k = 3, #t do flat[#flat + 1] = t[k] end
  end
  i = i + 4 + n
end
if #flat == 0 then event({'s', node, 0}) else event({'s', node, flat}) end
return conns
"""
)

# ARGV[5]: cid, ARGV[6]: lobby, ARGV[7]: max_per_lobby -> "" (a member now,
# or already) | "lobby_full" | "lost" (node or connection unknown: resync).
# The membership counts in ``lobbies`` (and, connected, in ``lu:<lobby>``)
# and goes with the node's hash; publishes "m".
JOIN = (
    _COMMON
    + """
if not redis.call('ZSCORE', K[4], node) then return 'lost' end
local cid, lobby = ARGV[5], ARGV[6]
local e = redis.call('HGET', K[5], cid)
if not e then return 'lost' end
local t = cjson.decode(e)
for i = 3, #t do
  if t[i] == lobby then return '' end
end
if tonumber(redis.call('HGET', K[2], lobby) or '0') >= tonumber(ARGV[7]) then return 'lobby_full' end
t[#t + 1] = lobby
redis.call('HINCRBY', K[2], lobby, 1)
redis.call('HSET', K[5], cid, cjson.encode(t))
if t[2] == 1 then
  online_in(lobby, t[1], 1)
  event({'m', node, cid, lobby})
end
return ''
"""
)

# ARGV[5]: cid, ARGV[6]: lobby -> 1 (left) | 0 (not a member)
PART = (
    _COMMON
    + """
local cid, lobby = ARGV[5], ARGV[6]
local e = redis.call('HGET', K[5], cid)
if not e then return 0 end
local t = cjson.decode(e)
for i = 3, #t do
  if t[i] == lobby then
    table.remove(t, i)
    hdec(K[2], lobby)
    redis.call('HSET', K[5], cid, cjson.encode(t))
    if t[2] == 1 then
      online_in(lobby, t[1], -1)
      event({'p', node, cid, lobby})
    end
    return 1
  end
end
return 0
"""
)

# -> 1 (lease renewed) | 0 (the node is unknown: reaped, or Redis restarted empty)
RENEW = (
    _COMMON
    + """
if not redis.call('ZSCORE', K[4], node) then return 0 end
redis.call('ZADD', K[4], now_ms() + lease, node)
return 1
"""
)

# ARGV[5]: max nodes per call -> nodes reaped (lease expired: connections freed)
REAP = (
    _COMMON
    + """
local dead = redis.call('ZRANGEBYSCORE', K[4], '-inf', now_ms(), 'LIMIT', 0, tonumber(ARGV[5]))
for _, n in ipairs(dead) do drop_node(n, ARGV[4] .. n) end
return #dead
"""
)

# clean shutdown of this node -> 1
LEAVE = (
    _COMMON
    + """
drop_node(node, K[5])
return 1
"""
)

# -> {node, {cid, entry, ...}, node, {...}, ...} for every registered node
SNAPSHOT = (
    _COMMON
    + """
local out = {}
for _, n in ipairs(redis.call('ZRANGE', K[4], 0, -1)) do
  out[#out + 1] = n
  out[#out + 1] = redis.call('HGETALL', ARGV[4] .. n)
end
return out
"""
)

# Reads for a Publisher (no node, no lease; KEYS and ARGV of its own).
# KEYS[1] <prefix>lu:<lobby>; ARGV[1] excluded user or "" -> connected
# connections of the lobby, that user's left out
LOBBY_COUNT = """
local n = 0
local vals = redis.call('HGETALL', KEYS[1])
for j = 1, #vals, 2 do
  if vals[j] ~= ARGV[1] then n = n + tonumber(vals[j + 1]) end
end
return n
"""

# History (issue 12; wsmanager.backends.redis_history): per lobby, on the
# Redis that carries the lobby's channel,
#
#     KEYS[1] <prefix>hs:<lobby>  stream: one entry per message, id <offset>-<ms>,
#                                 fields d (the text, "_pos" included), x (excluded user, if any)
#     KEYS[2] <prefix>hm:<lobby>  hash:   e (the epoch), o (the last offset given)
#
# Both carry the same expiry (history_ttl after the newest message), so they
# go together; a missing hash means the history was lost (Redis restarted
# empty, expired) and the next script starts a new epoch.

# ARGV[1] channel, ARGV[2] publish command (SPUBLISH | PUBLISH), ARGV[3] frame
# head (routing.frame_head), ARGV[4] lobby, ARGV[5] excluded user or "",
# ARGV[6] the text up to the epoch ('{..., "_pos":{"lobby":L,"epoch":"'),
# ARGV[7] history_size (MAXLEN ~), ARGV[8] history_ttl in ms (0: none),
# ARGV[9] the epoch to start if there is none -> the message's offset.
# Assigns the next offset, keeps the message and publishes it (a lobby record
# of routing.lobby_record, text with its position) in one step: every node
# receives the lobby's messages in offset order.
# ARGV[6] "" marks a gap instead (redis_history: messages lost while Redis was
# unreachable): the offset skips ARGV[7] (nothing kept or published), so a
# recovery across it is not contiguous and answers recovered false -> 0.
HISTORY_APPEND = """
local e = redis.call('HGET', KEYS[2], 'e')
if ARGV[6] == '' then
  if e then redis.call('HINCRBY', KEYS[2], 'o', tonumber(ARGV[7])) end
  return 0
end
local off
if e then
  off = redis.call('HINCRBY', KEYS[2], 'o', 1)
else
  e = ARGV[9]
  off = 1
  redis.call('DEL', KEYS[1])
  redis.call('HSET', KEYS[2], 'e', e, 'o', 1)
end
local t = redis.call('TIME')
local ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local text = ARGV[6] .. e .. '","offset":' .. string.format('%d', off) .. '}}'
local id = string.format('%d-%d', off, ms)
if ARGV[5] == '' then
  redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[7], id, 'd', text)
else
  redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[7], id, 'd', text, 'x', ARGV[5])
end
local ttl = tonumber(ARGV[8])
if ttl > 0 then
  redis.call('PEXPIRE', KEYS[1], ttl)
  redis.call('PEXPIRE', KEYS[2], ttl)
end
redis.call(ARGV[2], ARGV[1], ARGV[3] .. 'L' .. struct.pack('>I4I4I4', #ARGV[4], #ARGV[5], #text)
  .. ARGV[4] .. ARGV[5] .. text)
return off
"""

# ARGV[1] epoch ("": the position only), ARGV[2] offset, ARGV[3] history_size,
# ARGV[4] history_ttl in ms (0: none), ARGV[5] the epoch to start if there is
# none -> {recovered 0|1, epoch, top, text, excluded user or "", ...}: the
# kept messages after the offset when all of them are kept (no more than
# history_size missed, the oldest needed younger than history_ttl), the
# lobby's position (epoch, top) in any case; not when the kept messages after the
# offset skip one (a gap, see HISTORY_APPEND). A lobby without history gets
# its epoch now (offset 0): a client told it must find it in the next message.
HISTORY_READ = """
local m = redis.call('HMGET', KEYS[2], 'e', 'o')
local e, top = m[1], tonumber(m[2] or '0')
local ttl = tonumber(ARGV[4])
if not e then
  e = ARGV[5]
  redis.call('DEL', KEYS[1])
  redis.call('HSET', KEYS[2], 'e', e, 'o', 0)
  if ttl > 0 then redis.call('PEXPIRE', KEYS[2], ttl) end
  return {0, e, 0}
end
if ARGV[1] ~= e then return {0, e, top} end
local since = tonumber(ARGV[2])
if since > top or top - since > tonumber(ARGV[3]) then return {0, e, top} end
if since == top then return {1, e, top} end
local got = redis.call('XRANGE', KEYS[1], string.format('%d-0', since + 1), '+')
if #got == 0 then return {0, e, top} end
if #got ~= top - since then return {0, e, top} end
local first = got[1][1]
local dash = string.find(first, '-', 1, true)
if tonumber(string.sub(first, 1, dash - 1)) ~= since + 1 then return {0, e, top} end
if ttl > 0 then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  if tonumber(string.sub(first, dash + 1)) < now - ttl then return {0, e, top} end
end
local out = {1, e, top}
for _, entry in ipairs(got) do
  local f = entry[2]
  local text, x = '', ''
  for i = 1, #f, 2 do
    if f[i] == 'd' then text = f[i + 1] elseif f[i] == 'x' then x = f[i + 1] end
  end
  out[#out + 1] = text
  out[#out + 1] = x
end
return out
"""

# At the start of each session. After a Redis restart (no epoch key: this is
# the first node back), register the other nodes this node last knew, with
# their connections, so that their seats count until they rejoin or their
# lease (ARGV[5] ms) expires, and set the epoch key to ARGV[6] (a new random
# token). ARGV[7..]: per node: node id, n, then n pairs cid, entry (JSON
# [user, 1, lobby, ...]). Nodes already registered are left alone.
# -> {nodes registered, the epoch token, 1 if this node is registered else 0}:
# a node that registered under the same epoch and is gone was reaped.
REVIVE = (
    _COMMON
    + """
local key = base .. 'epoch'
if redis.call('SETNX', key, ARGV[6]) == 0 then
  local present = 0
  if redis.call('ZSCORE', K[4], node) then present = 1 end
  return {0, redis.call('GET', key), present}
end
local expiry = now_ms() + tonumber(ARGV[5])
local revived = 0
local i = 7
while i <= #ARGV do
  local other, n = ARGV[i], tonumber(ARGV[i + 1])
  i = i + 2
  if other ~= node and not redis.call('ZSCORE', K[4], other) then
    local h = ARGV[4] .. other
    redis.call('ZADD', K[4], expiry, other)
    revived = revived + 1
    for k = 0, n - 1 do
      local cid, e = ARGV[i + 2 * k], ARGV[i + 2 * k + 1]
      if redis.call('HEXISTS', h, cid) == 0 then
        local t = cjson.decode(e)
        account(t)
        online(t, 1)
        redis.call('HSET', h, cid, e)
      end
    end
  end
  i = i + 2 * n
end
return {revived, ARGV[6], 0}
"""
)

# This node found itself reaped while alive (frozen longer than its lease)
# and has just re-registered (SYNC, no limit checks). ARGV[5..7]:
# max_connections, max_per_lobby, max_per_user (-1: none); ARGV[8..]: cids
# already being shed (closing, not yet released: counted as gone) -> the
# cids of its other entries (connected, or handshakes: shed once connected)
# to shed, newest (highest cid) first,
# so that the cluster's counts get back under each limit. Changes nothing.
OVER = (
    _COMMON
    + """
local over_total = tonumber(redis.call('GET', K[1]) or '0') - tonumber(ARGV[5])
local max_lobby, max_user = tonumber(ARGV[6]), tonumber(ARGV[7])
local have = redis.call('HGETALL', K[5])
local cids, entries = {}, {}
for j = 1, #have, 2 do
  cids[#cids + 1] = have[j]
  entries[have[j]] = cjson.decode(have[j + 1])
end
table.sort(cids, function(a, b) return (tonumber(a) or 0) > (tonumber(b) or 0) end)
local over_lobby, over_user, out = {}, {}, {}
local function init(t)
  if max_user >= 0 and over_user[t[1]] == nil then
    over_user[t[1]] = tonumber(redis.call('HGET', K[3], t[1]) or '0') - max_user
  end
  for i = 3, #t do
    if over_lobby[t[i]] == nil then
      over_lobby[t[i]] = tonumber(redis.call('HGET', K[2], t[i]) or '0') - max_lobby
    end
  end
end
local function gone(t)
  over_total = over_total - 1
  if max_user >= 0 then over_user[t[1]] = over_user[t[1]] - 1 end
  for i = 3, #t do over_lobby[t[i]] = over_lobby[t[i]] - 1 end
end
local closing = {}
for i = 8, #ARGV do
  local t = entries[ARGV[i]]
  if t and not closing[ARGV[i]] then
    closing[ARGV[i]] = true
    init(t)
    gone(t)
  end
end
for _, cid in ipairs(cids) do
  local t = entries[cid]
  if not closing[cid] then
    init(t)
    local shed = over_total > 0
    if max_user >= 0 and over_user[t[1]] > 0 then shed = true end
    for i = 3, #t do
      if over_lobby[t[i]] > 0 then shed = true end
    end
    if shed then
      out[#out + 1] = cid
      gone(t)
    end
  end
end
return out
"""
)
