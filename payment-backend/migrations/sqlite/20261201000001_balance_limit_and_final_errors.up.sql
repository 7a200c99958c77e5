-- No balance above 10^17 minor units (money::MAX_BALANCE_MINOR), available
-- and held together, and never a non-integer one (SQLite turns an integer
-- that overflows into a REAL): the service refuses such a credit first, and
-- the database refuses to store one whatever writes it. SQLite cannot add a
-- CHECK to an existing table, so triggers enforce it.
CREATE TRIGGER accounts_balance_limit_insert BEFORE INSERT ON accounts
WHEN typeof(NEW.available) <> 'integer' OR typeof(NEW.held) <> 'integer'
    OR NEW.available > 100000000000000000 OR NEW.held > 100000000000000000 - NEW.available
BEGIN
    SELECT RAISE(ABORT, 'accounts_balance_limit: balances must be integers of at most 100000000000000000 minor units');
END;
CREATE TRIGGER accounts_balance_limit_update BEFORE UPDATE OF available, held ON accounts
WHEN typeof(NEW.available) <> 'integer' OR typeof(NEW.held) <> 'integer'
    OR NEW.available > 100000000000000000 OR NEW.held > 100000000000000000 - NEW.available
BEGIN
    SELECT RAISE(ABORT, 'accounts_balance_limit: balances must be integers of at most 100000000000000000 minor units');
END;

-- An idempotency key records its call's final error (FAILED_PRECONDITION,
-- NOT_FOUND) as the status it was answered with, so retries get the same
-- answer; `response` stays NULL then.
ALTER TABLE idempotency_keys ADD COLUMN error_code INTEGER;
ALTER TABLE idempotency_keys ADD COLUMN error_message TEXT;
ALTER TABLE idempotency_keys ADD COLUMN error_details BLOB;
