-- Portals: one row per installed Bitrix24 account (member_id).
CREATE TABLE IF NOT EXISTS portals (
    member_id         text PRIMARY KEY,
    domain            text NOT NULL,
    client_endpoint   text NOT NULL,
    server_endpoint   text,
    access_token      text,
    refresh_token     text,
    expires_at        timestamptz,
    application_token text,
    -- installed | uninstalled | needs_reinstall | deleted
    status            text NOT NULL DEFAULT 'installed',
    app_status        text,
    payment_expired   boolean,
    days_left         integer,
    installed_at      timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS portals_domain ON portals (domain);

-- Events: one row per distinct inbound event; redeliveries and duplicates share it.
CREATE TABLE IF NOT EXISTS events (
    id            bigserial PRIMARY KEY,
    dedup_key     text NOT NULL UNIQUE,
    envelope_id   uuid NOT NULL,
    member_id     text,
    kind          text NOT NULL,
    event         text NOT NULL,
    -- processing | done | retrying | dead | ignored
    status        text NOT NULL,
    attempts      integer NOT NULL DEFAULT 0,
    last_error    text,
    error_code    text,
    payload       jsonb NOT NULL,
    received_at   timestamptz NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS events_member_status ON events (member_id, status);

-- Entities: what the events pointed at, as Bitrix24 returned it.
CREATE TABLE IF NOT EXISTS entities (
    member_id  text NOT NULL,
    kind       text NOT NULL,
    entity_id  text NOT NULL,
    data       jsonb NOT NULL,
    fetched_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (member_id, kind, entity_id)
);

-- The per-portal request budget shared by all replicas (GCRA: theoretical arrival time).
CREATE TABLE IF NOT EXISTS rate_limits (
    member_id text PRIMARY KEY,
    tat       timestamptz NOT NULL
);

-- Per portal and method: execution time used (Bitrix24's `time.operating`) and when
-- that budget resets; `paused_until` after a 429 OPERATION_TIME_LIMIT.
CREATE TABLE IF NOT EXISTS method_budgets (
    member_id          text NOT NULL,
    method             text NOT NULL,
    operating          double precision NOT NULL DEFAULT 0,
    operating_reset_at timestamptz,
    paused_until       timestamptz,
    PRIMARY KEY (member_id, method)
);
