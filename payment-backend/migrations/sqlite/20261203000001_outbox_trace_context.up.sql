-- The W3C traceparent of the transaction that wrote an event: its
-- publish to Kafka continues that trace (NULL when it was not traced).
ALTER TABLE outbox ADD COLUMN trace_context TEXT;
