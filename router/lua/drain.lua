-- Take a user's offline pushes: all of them, oldest first, and delete the
-- list, in one step (two nodes draining at once never both get one).
-- KEYS[1] the user's offline list.
local v = redis.call('LRANGE', KEYS[1], 0, -1)
redis.call('DEL', KEYS[1])
return v
