-- Byte quotas per repository prefix. The configured rules are written here at start-up. For each
-- scope of a rule, `quota_holdings` lists every digest its repositories hold (blob links and
-- manifest rows) with how many such holdings it has there, and `quota_scopes` the bytes of those
-- digests, each counted once. Every write that links or unlinks keeps both up to date in its own
-- transaction, so checking a push against its scope is a few lookups by key.
CREATE TABLE quota_rules (
    rule TEXT PRIMARY KEY,
    max_bytes BIGINT NOT NULL
);

CREATE TABLE quota_scopes (
    rule TEXT NOT NULL,
    scope TEXT NOT NULL,
    bytes BIGINT NOT NULL,
    PRIMARY KEY (rule, scope)
);

CREATE TABLE quota_holdings (
    rule TEXT NOT NULL,
    scope TEXT NOT NULL,
    digest TEXT NOT NULL,
    size BIGINT NOT NULL,
    holders BIGINT NOT NULL,
    PRIMARY KEY (rule, scope, digest)
);
