-- Events for events.webhook_url: the outbox, written in the transaction of the
-- change each event reports, delivered by one node at a time (a lease).
CREATE TABLE wxauth_outbox (
    -- The order of events: per user, the order their changes committed (an event
    -- is inserted after its change locked the user's row).
    seq            bigserial PRIMARY KEY,
    user_id        bigint  NOT NULL,
    -- The event as the embedded store keeps it (JSON: webhook-id, type, data,
    -- attempts, last error, …); the columns below repeat what delivery selects on.
    record         text    NOT NULL,
    -- Given up after events.retry_for: kept for `wxauth events list|retry`, and no
    -- longer holding the user's later events.
    failed         boolean NOT NULL DEFAULT false,
    -- Not before this unix millisecond (the backoff after a failed attempt).
    next_attempt_ms bigint NOT NULL DEFAULT 0,
    -- A node delivering it holds it until this unix millisecond: no other node
    -- sends it meanwhile; a node killed mid-delivery leaves it to the next after.
    lease_until_ms bigint  NOT NULL DEFAULT 0,
    lease_holder   text
);

-- A user's pending events in order (the delivery's "oldest of its user" check).
CREATE INDEX wxauth_outbox_user ON wxauth_outbox (user_id, seq) WHERE NOT failed;
