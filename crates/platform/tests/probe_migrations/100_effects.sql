-- The probe service's one table: effects of the events its consumer handled.
CREATE TABLE effects (
    message_id uuid PRIMARY KEY,
    note       text NOT NULL
);
