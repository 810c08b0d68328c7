-- Messaging tables every service gets, created in the service's own schema (the search_path).

-- Events written in the same transaction as the change that caused them, and published to
-- RabbitMQ by the outbox relay after the commit.
CREATE TABLE outbox (
    id           BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- The AMQP message_id; consumers deduplicate on it, so a row published twice acts once.
    message_id   UUID NOT NULL UNIQUE,
    routing_key  TEXT NOT NULL,
    body         BYTEA NOT NULL,
    -- Text AMQP headers, mainly the W3C trace context of the request that wrote the row.
    headers      JSONB NOT NULL DEFAULT '{}'::jsonb,
    created_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    -- Set once the broker has confirmed the message; NULL means still to be published.
    delivered_at TIMESTAMPTZ
);

-- The relay's query: pending rows in order. Partial, so delivered rows cost it nothing.
CREATE INDEX outbox_pending ON outbox (id) WHERE delivered_at IS NULL;

-- Wakes the relay when rows are committed. NOTIFY is delivered only on commit, and never for
-- a rolled-back transaction. The channel carries the schema name, so services sharing one
-- database (the all-in-one process) wake only their own relay.
CREATE FUNCTION outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('ferrite_outbox_' || TG_TABLE_SCHEMA, '');
    RETURN NULL;
END;
$$;

CREATE TRIGGER outbox_notify AFTER INSERT ON outbox
    FOR EACH STATEMENT EXECUTE FUNCTION outbox_notify();

-- Messages each consumer (named after its queue) has processed, written in the same
-- transaction as the handler's effect: a redelivered message finds its id here and is skipped.
CREATE TABLE inbox (
    consumer     TEXT NOT NULL,
    message_id   UUID NOT NULL,
    processed_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, message_id)
);

-- For pruning old rows of both tables.
CREATE INDEX outbox_delivered_at ON outbox (delivered_at) WHERE delivered_at IS NOT NULL;
CREATE INDEX inbox_processed_at ON inbox (processed_at);
