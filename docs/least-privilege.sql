-- Least-privilege database roles for the web app and the relay.
--
-- Run once per database as the owner of the schema, after `alembic upgrade head`:
--     psql "$DATABASE_URL" -v ON_ERROR_STOP=1 -f docs/least-privilege.sql
-- then give each role a password (ALTER ROLE outbox_web PASSWORD '...') and put it in the
-- DATABASE_URL of `outbox web` and of `outbox relay`. Migrations (and `outbox status`, `dead`,
-- `retry`, `purge`) keep running as the owner. Safe to run again after a new migration.
-- tests/integration/test_least_privilege.py runs the app and a relay under these roles.

DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'outbox_web') THEN
        CREATE ROLE outbox_web LOGIN;
    END IF;
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'outbox_relay') THEN
        CREATE ROLE outbox_relay LOGIN;
    END IF;
END
$$;

REVOKE ALL ON users, outbox, rate_limits, alembic_version FROM outbox_web, outbox_relay;
GRANT USAGE ON SCHEMA public TO outbox_web, outbox_relay;

-- The web app: create users and verify them, enqueue mail (and read back the new message's
-- UUID, which INSERT ... RETURNING needs), count rate limits. It cannot read, change or delete
-- queued mail, nor read password hashes (it writes them: a signup for an address whose account is
-- not verified yet replaces the password and the token nonce).
GRANT SELECT (id, email, email_key, token_nonce, verified_at) ON users TO outbox_web;
GRANT INSERT (email, email_key, password_hash) ON users TO outbox_web;
GRANT UPDATE (email, verified_at, password_hash, token_nonce) ON users TO outbox_web;
GRANT INSERT (topic, payload, available_at), SELECT (message_id) ON outbox TO outbox_web;
GRANT SELECT, INSERT, UPDATE, DELETE ON rate_limits TO outbox_web;

-- The relay: claim (SELECT ... FOR UPDATE needs UPDATE), settle, and purge sent rows with
-- --retention. It has no access to users at all.
GRANT SELECT, UPDATE, DELETE ON outbox TO outbox_relay;
