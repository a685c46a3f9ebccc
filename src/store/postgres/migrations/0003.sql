-- How much each secret is used (see store/activity.rs), added to by the commit core in the
-- same statement as the audit entries it counts. Filled from the trail when made (see
-- schema.rs).
CREATE TABLE {schema}.activity (
    secret_id uuid PRIMARY KEY,
    leases_issued bigint NOT NULL,
    redemptions bigint NOT NULL,
    failed_redemptions bigint NOT NULL,
    last_leased_at bigint,
    last_redeemed_at bigint,
    last_redeemed_by text
);

-- Per UTC day (days since the epoch), secret and principal ('' for none).
CREATE TABLE {schema}.activity_days (
    tenant text COLLATE "C" NOT NULL,
    day bigint NOT NULL,
    secret_id uuid NOT NULL,
    principal text COLLATE "C" NOT NULL,
    name text COLLATE "C" NOT NULL,
    leases bigint NOT NULL,
    redemptions bigint NOT NULL,
    failed_redemptions bigint NOT NULL,
    PRIMARY KEY (tenant, day, secret_id, principal)
);
CREATE INDEX activity_days_by_name ON {schema}.activity_days (tenant, name, day);
