-- What instances sharing one database coordinate through.
--
-- Background work that must run on one instance at a time (collection, the purge of idle
-- uploads) runs while its instance holds the lease of that name; a holder that dies loses it when
-- it expires.
CREATE TABLE leases (
    name TEXT PRIMARY KEY,
    holder TEXT NOT NULL,
    expires_at_ms BIGINT NOT NULL
);

-- A push holds the digest it stores from before its bytes are written until they are recorded, so
-- that a sweep on another instance does not delete them in between: a sweep claims no held digest,
-- and a digest already claimed cannot be held (the push waits for the sweep). A hold whose push
-- died expires.
CREATE TABLE holds (
    id TEXT PRIMARY KEY,
    digest TEXT NOT NULL,
    expires_at_ms BIGINT NOT NULL
);
CREATE INDEX holds_by_digest ON holds (digest);
