-- Byte quotas per repository prefix, as ../0004_quotas.sql.
CREATE TABLE quota_rules (
    rule TEXT COLLATE "C" PRIMARY KEY,
    max_bytes BIGINT NOT NULL
);

CREATE TABLE quota_scopes (
    rule TEXT COLLATE "C" NOT NULL,
    scope TEXT COLLATE "C" NOT NULL,
    bytes BIGINT NOT NULL,
    PRIMARY KEY (rule, scope)
);

CREATE TABLE quota_holdings (
    rule TEXT COLLATE "C" NOT NULL,
    scope TEXT COLLATE "C" NOT NULL,
    digest TEXT COLLATE "C" NOT NULL,
    size BIGINT NOT NULL,
    holders BIGINT NOT NULL,
    PRIMARY KEY (rule, scope, digest)
);
