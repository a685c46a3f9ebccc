-- What each tenant holds, kept by the commit core in the same transaction as the records it
-- counts (so that every replica holds tenants to the same quotas). `tenant` is the tenant's
-- name, or '' for all tenants together. Filled from the records when made (see schema.rs).
CREATE TABLE {schema}.usage (
    tenant text COLLATE "C" PRIMARY KEY,
    secrets bigint NOT NULL,
    value_bytes bigint NOT NULL,
    leases bigint NOT NULL
);
