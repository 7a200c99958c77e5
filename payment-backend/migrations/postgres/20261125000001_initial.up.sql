-- Accounts, payments, refunds, the double-entry ledger, idempotency records
-- and the transactional outbox. Times are microseconds since the Unix epoch;
-- amounts are integer minor units.

CREATE TABLE accounts (
    id          TEXT PRIMARY KEY,
    owner       TEXT NOT NULL,
    currency    TEXT NOT NULL,
    status      TEXT NOT NULL,
    -- Cached balances; the ledger is the source of truth and
    -- `payment-backend verify-ledger` checks that they agree.
    available   BIGINT NOT NULL CHECK (available >= 0),
    held        BIGINT NOT NULL CHECK (held >= 0),
    created_at  BIGINT NOT NULL,
    updated_at  BIGINT NOT NULL
);

CREATE TABLE payments (
    id                       TEXT PRIMARY KEY,
    payer_account_id         TEXT NOT NULL REFERENCES accounts (id),
    payee_account_id         TEXT NOT NULL REFERENCES accounts (id),
    currency                 TEXT NOT NULL,
    amount                   BIGINT NOT NULL CHECK (amount > 0),
    amount_capturable        BIGINT NOT NULL CHECK (amount_capturable >= 0),
    amount_captured          BIGINT NOT NULL CHECK (amount_captured >= 0),
    amount_refunded          BIGINT NOT NULL CHECK (amount_refunded >= 0 AND amount_refunded <= amount_captured),
    status                   TEXT NOT NULL,
    capture_method           TEXT NOT NULL,
    decline_code             TEXT,
    description              TEXT NOT NULL,
    metadata                 TEXT NOT NULL,
    cancellation_reason      TEXT NOT NULL,
    created_at               BIGINT NOT NULL,
    updated_at               BIGINT NOT NULL,
    authorization_expires_at BIGINT,
    event_seq                BIGINT NOT NULL
);
CREATE INDEX payments_created ON payments (created_at DESC, id DESC);
CREATE INDEX payments_payer_created ON payments (payer_account_id, created_at DESC, id DESC);
CREATE INDEX payments_payee_created ON payments (payee_account_id, created_at DESC, id DESC);
CREATE INDEX payments_expiring ON payments (authorization_expires_at) WHERE status = 'REQUIRES_CAPTURE';

CREATE TABLE refunds (
    id          TEXT PRIMARY KEY,
    payment_id  TEXT NOT NULL REFERENCES payments (id),
    amount      BIGINT NOT NULL CHECK (amount > 0),
    currency    TEXT NOT NULL,
    status      TEXT NOT NULL,
    reason      TEXT NOT NULL,
    created_at  BIGINT NOT NULL
);
CREATE INDEX refunds_payment ON refunds (payment_id, created_at DESC, id DESC);

-- Every balance change is a group of entries (one ledger transaction, txn_id)
-- that sums to zero. `account_id` is a customer account (buckets `available`
-- and `held`) or the outside world `external:<CUR>` (bucket `external`).
CREATE TABLE ledger_entries (
    id          BIGSERIAL PRIMARY KEY,
    txn_id      TEXT NOT NULL,
    kind        TEXT NOT NULL,
    account_id  TEXT NOT NULL,
    bucket      TEXT NOT NULL,
    amount      BIGINT NOT NULL,
    currency    TEXT NOT NULL,
    payment_id  TEXT,
    created_at  BIGINT NOT NULL
);
CREATE INDEX ledger_entries_account ON ledger_entries (account_id, bucket);
CREATE INDEX ledger_entries_txn ON ledger_entries (txn_id);

-- One row per (caller, key). The primary key is what makes a key execute
-- once: a concurrent insert of the same key waits for the first transaction
-- and then finds its row.
CREATE TABLE idempotency_keys (
    scope        TEXT NOT NULL,
    key          TEXT NOT NULL,
    method       TEXT NOT NULL,
    fingerprint  BYTEA NOT NULL,
    response     BYTEA,
    created_at   BIGINT NOT NULL,
    PRIMARY KEY (scope, key)
);
CREATE INDEX idempotency_keys_created ON idempotency_keys (created_at);

CREATE TABLE outbox (
    id               BIGSERIAL PRIMARY KEY,
    event_id         TEXT NOT NULL UNIQUE,
    event_type       TEXT NOT NULL,
    payment_id       TEXT NOT NULL,
    payload          BYTEA NOT NULL,
    created_at       BIGINT NOT NULL,
    attempts         INTEGER NOT NULL DEFAULT 0,
    next_attempt_at  BIGINT NOT NULL,
    last_error       TEXT,
    published_at     BIGINT,
    dead_lettered_at BIGINT
);
CREATE INDEX outbox_pending ON outbox (id) WHERE published_at IS NULL;

-- Only the holder of the lease relays the outbox, so per-payment order holds
-- with several backend replicas.
CREATE TABLE relay_lease (
    name        TEXT PRIMARY KEY,
    holder      TEXT NOT NULL,
    expires_at  BIGINT NOT NULL
);
