-- Leases and pushes' holds, as ../0005_leases.sql.
CREATE TABLE leases (
    name TEXT PRIMARY KEY,
    holder TEXT NOT NULL,
    expires_at_ms BIGINT NOT NULL
);

CREATE TABLE holds (
    id TEXT PRIMARY KEY,
    digest TEXT NOT NULL,
    expires_at_ms BIGINT NOT NULL
);
CREATE INDEX holds_by_digest ON holds (digest);
