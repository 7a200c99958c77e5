DROP INDEX outbox_published;
DROP INDEX outbox_pending_payment;
ALTER TABLE relay_lease DROP COLUMN token;
