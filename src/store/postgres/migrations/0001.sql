-- byokd's records, audit trail and commit position. {schema} is replaced by the configured
-- schema's name. Records are stored in the store codec (as in a backup file); the columns
-- beside them are what lookups and guards need.

-- Where the revisions stand: the largest assigned, kept in the same transaction as the
-- records that carry them.
CREATE TABLE {schema}.position (
    one boolean PRIMARY KEY DEFAULT true CHECK (one),
    last_revision bigint NOT NULL
);
INSERT INTO {schema}.position (one, last_revision) VALUES (true, 0);

-- Names compare bytewise (COLLATE "C"), as every engine lists them.
CREATE TABLE {schema}.secrets (
    tenant text COLLATE "C" NOT NULL,
    name text COLLATE "C" NOT NULL,
    id uuid NOT NULL UNIQUE,
    version integer NOT NULL,
    rev bigint NOT NULL,
    record bytea NOT NULL,
    PRIMARY KEY (tenant, name)
);

CREATE TABLE {schema}.envelopes (
    secret_id uuid NOT NULL,
    version integer NOT NULL,
    rev bigint NOT NULL,
    record bytea NOT NULL,
    PRIMARY KEY (secret_id, version)
);

-- A lease names its secret by tenant and name (a redemption reads both in one join).
CREATE TABLE {schema}.leases (
    token_hash bytea PRIMARY KEY,
    id uuid NOT NULL UNIQUE,
    tenant text COLLATE "C" NOT NULL,
    name text COLLATE "C" NOT NULL,
    expires_at bigint NOT NULL,
    rev bigint NOT NULL,
    record bytea NOT NULL
);
CREATE INDEX leases_by_expiry ON {schema}.leases (expires_at);

CREATE TABLE {schema}.meta (
    name text PRIMARY KEY,
    rev bigint NOT NULL,
    value bytea NOT NULL
);

-- The anchor a prune leaves: the last pruned entry's seq and hash, under a MAC.
CREATE TABLE {schema}.anchor (
    one boolean PRIMARY KEY DEFAULT true CHECK (one),
    seq bigint NOT NULL,
    record bytea NOT NULL
);

-- The audit trail: one row per entry, gap-free seqs. `index_keys` holds the entry's index
-- keys (the same as the sled engine's: tenant, secret, principal, action, ...), so that a
-- filtered audit query is one indexed statement.
CREATE TABLE {schema}.audit (
    seq bigint PRIMARY KEY,
    time bigint NOT NULL,
    index_keys bytea[] NOT NULL,
    record bytea NOT NULL
);
CREATE INDEX audit_by_index_key ON {schema}.audit USING gin (index_keys);
