-- Users under erasure: the collector drops their events. The eraser fills this table; the
-- collector keeps an in-memory copy, refreshed on NOTIFY and periodically in full.
CREATE SCHEMA IF NOT EXISTS collector;

CREATE TABLE collector.suppressed_users (
    user_id    text PRIMARY KEY,
    request_id uuid,
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE FUNCTION collector.notify_suppression() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('feedloop_suppression', NEW.user_id);
    RETURN NEW;
END;
$$;

CREATE TRIGGER suppressed_users_notify
    AFTER INSERT ON collector.suppressed_users
    FOR EACH ROW EXECUTE FUNCTION collector.notify_suppression();
