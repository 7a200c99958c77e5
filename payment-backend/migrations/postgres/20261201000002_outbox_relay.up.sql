-- The outbox relay's lease gets a fencing token, and the outbox indexes for
-- holding a payment's later events back behind one that is still backing
-- off and for deleting published events once they are past retention.

-- Grows by one each time the lease is taken by a holder that did not hold
-- it without a break. Every write that records a publication checks the
-- token its relay got, so a relay that lost the lease records nothing.
ALTER TABLE relay_lease ADD COLUMN token BIGINT NOT NULL DEFAULT 0;

-- A payment's unpublished events: whether one before a due event is still
-- backing off, which holds that event back (`pending_events` looks this up
-- for each due event it takes, so it costs one index probe per event).
CREATE INDEX outbox_pending_payment ON outbox (payment_id, id, next_attempt_at) WHERE published_at IS NULL;
-- Published and dead-lettered events by age (`purge_outbox`).
CREATE INDEX outbox_published ON outbox (published_at) WHERE published_at IS NOT NULL;
