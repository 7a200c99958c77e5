-- Keys that stored an error have no response: the version before this one
-- cannot replay them, so they are forgotten (their calls may run again).
DELETE FROM idempotency_keys WHERE error_code IS NOT NULL;
ALTER TABLE idempotency_keys DROP COLUMN error_details;
ALTER TABLE idempotency_keys DROP COLUMN error_message;
ALTER TABLE idempotency_keys DROP COLUMN error_code;
DROP TRIGGER accounts_balance_limit_update;
DROP TRIGGER accounts_balance_limit_insert;
