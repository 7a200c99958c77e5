-- Keys that stored an error have no response: the version before this one
-- cannot replay them, so they are forgotten (their calls may run again).
DELETE FROM idempotency_keys WHERE error_code IS NOT NULL;
ALTER TABLE idempotency_keys
    DROP COLUMN error_details,
    DROP COLUMN error_message,
    DROP COLUMN error_code;
ALTER TABLE accounts DROP CONSTRAINT accounts_balance_limit;
