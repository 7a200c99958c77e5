DROP TABLE relay_lease;
DROP TABLE outbox;
DROP TABLE idempotency_keys;
DROP TABLE ledger_entries;
DROP TABLE refunds;
DROP TABLE payments;
DROP TABLE accounts;
