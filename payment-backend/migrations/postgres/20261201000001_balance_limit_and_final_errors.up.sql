-- No balance above 10^17 minor units (money::MAX_BALANCE_MINOR), available
-- and held together: the service refuses such a credit first, and the
-- database refuses to store one whatever writes it. `held <= L - available`
-- cannot overflow, as `available + held` could.
ALTER TABLE accounts ADD CONSTRAINT accounts_balance_limit
    CHECK (available <= 100000000000000000 AND held <= 100000000000000000 - available);

-- An idempotency key records its call's final error (FAILED_PRECONDITION,
-- NOT_FOUND) as the status it was answered with, so retries get the same
-- answer; `response` stays NULL then.
ALTER TABLE idempotency_keys
    ADD COLUMN error_code INTEGER,
    ADD COLUMN error_message TEXT,
    ADD COLUMN error_details BYTEA;
