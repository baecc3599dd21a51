-- Trust and lifecycle (issues 10 and 11).

-- The application_token is a secret that only needs comparing: keep its SHA-256.
ALTER TABLE portals ADD COLUMN IF NOT EXISTS application_token_sha256 text;
UPDATE portals
   SET application_token_sha256 = encode(sha256(convert_to(application_token, 'UTF8')), 'hex')
 WHERE application_token IS NOT NULL AND application_token_sha256 IS NULL;
ALTER TABLE portals DROP COLUMN IF EXISTS application_token;

-- access_token and refresh_token hold sealed values (`v1.<key id>.<base64>`) from now
-- on; the worker seals rows still in clear text when it starts.

-- When the stored pair was last issued (refresh tokens live 180 days).
ALTER TABLE portals ADD COLUMN IF NOT EXISTS tokens_issued_at timestamptz;
UPDATE portals SET tokens_issued_at = updated_at WHERE tokens_issued_at IS NULL;

-- The first PORTAL_DELETED answer of a run of them: the portal is marked `deleted` only
-- when they keep coming for a while (self-hosted portals close temporarily).
ALTER TABLE portals ADD COLUMN IF NOT EXISTS gone_since timestamptz;

-- The last app.info fetched for the portal (ONAPPPAYMENT is debounced on it).
ALTER TABLE portals ADD COLUMN IF NOT EXISTS app_checked_at timestamptz;
ALTER TABLE portals ADD COLUMN IF NOT EXISTS app_version text;

-- The offline-event reconciler's lease: one replica polls a portal at a time.
ALTER TABLE portals ADD COLUMN IF NOT EXISTS reconcile_owner text;
ALTER TABLE portals ADD COLUMN IF NOT EXISTS reconcile_until timestamptz;
ALTER TABLE portals ADD COLUMN IF NOT EXISTS reconciled_at timestamptz;
-- A pass's `process_id` whose records were reserved but not yet cleared: the next pass
-- asks for them again with it (reserved records are hidden from other readers).
ALTER TABLE portals ADD COLUMN IF NOT EXISTS reconcile_process_id text;

-- One live portal per domain, and the domain is the host of its client_endpoint.
-- Rows that clash today can only come from an unverified install: the older ones are
-- set aside as uninstalled (and audited) so the index can be built.
CREATE TABLE IF NOT EXISTS portal_audit (
    id        bigserial PRIMARY KEY,
    member_id text NOT NULL,
    action    text NOT NULL,
    detail    jsonb NOT NULL DEFAULT '{}'::jsonb,
    at        timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS portal_audit_member ON portal_audit (member_id, at);

WITH ranked AS (
    SELECT member_id,
           row_number() OVER (PARTITION BY lower(domain) ORDER BY updated_at DESC) AS n
      FROM portals
     WHERE status NOT IN ('uninstalled', 'deleted')
), demoted AS (
    UPDATE portals p SET status = 'uninstalled', access_token = NULL, refresh_token = NULL,
                         updated_at = now()
      FROM ranked r
     WHERE p.member_id = r.member_id AND r.n > 1
    RETURNING p.member_id, p.domain
)
INSERT INTO portal_audit (member_id, action, detail)
SELECT member_id, 'demoted_duplicate_domain', jsonb_build_object('domain', domain) FROM demoted;

DROP INDEX IF EXISTS portals_domain;
CREATE UNIQUE INDEX IF NOT EXISTS portals_live_domain ON portals (lower(domain))
    WHERE status NOT IN ('uninstalled', 'deleted');

-- The per-portal budget learns what the portal really allows: the interval between
-- requests it tolerated last (NULL: the configured rate).
ALTER TABLE rate_limits ADD COLUMN IF NOT EXISTS interval_s double precision;

-- Entities: jsonb cannot hold U+0000. When Bitrix24's answer has it, `raw` keeps the
-- exact answer (json keeps any text) and `data` has U+FFFD in its place.
ALTER TABLE entities ADD COLUMN IF NOT EXISTS raw json;

-- The refresh token an installation was proved with (its SHA-256) and when: Bitrix24
-- may hand the same pair to the install page and to ONAPPINSTALL, and the second proof
-- finds it used. Seeing exactly the token we proved minutes ago is proof enough.
ALTER TABLE portals ADD COLUMN IF NOT EXISTS proven_refresh_sha256 text;
ALTER TABLE portals ADD COLUMN IF NOT EXISTS proven_at timestamptz;

-- The per-portal budget reserves a slot only when it comes soon enough (a longer wait
-- goes back to a delay queue), and learns: a QUERY_LIMIT_EXCEEDED the budget did not
-- foresee lengthens the portal's interval (`interval_s`) and shortens its burst
-- (`burst_n`) for every replica; each granted slot lets both drift back to the
-- configured values.
ALTER TABLE rate_limits ADD COLUMN IF NOT EXISTS burst_n double precision;

CREATE OR REPLACE FUNCTION b24_reserve_slot(
    p_member text, p_interval float8, p_burst float8, p_margin float8, p_max_wait float8,
    OUT wait float8, OUT granted boolean)
LANGUAGE plpgsql AS $$
DECLARE
    now_ts timestamptz := clock_timestamp();
    r rate_limits%ROWTYPE;
    i float8;
    tol float8;
BEGIN
    INSERT INTO rate_limits (member_id, tat) VALUES (p_member, now_ts)
        ON CONFLICT (member_id) DO NOTHING;
    SELECT * INTO r FROM rate_limits WHERE member_id = p_member FOR UPDATE;
    i := greatest(coalesce(r.interval_s, p_interval), p_interval);
    tol := greatest(least(coalesce(r.burst_n, p_burst), p_burst) - 1 - p_margin, 0) * i;
    wait := extract(epoch FROM greatest(r.tat, now_ts) - now_ts) - tol;
    IF wait > p_max_wait THEN
        granted := false;
        RETURN;
    END IF;
    UPDATE rate_limits
       SET tat = greatest(r.tat, now_ts) + make_interval(secs => i),
           interval_s = CASE WHEN r.interval_s IS NULL OR r.interval_s * 0.99 <= p_interval
                             THEN NULL ELSE r.interval_s * 0.99 END,
           burst_n = CASE WHEN r.burst_n IS NULL OR r.burst_n + 0.05 >= p_burst
                          THEN NULL ELSE r.burst_n + 0.05 END
     WHERE member_id = p_member;
    wait := greatest(wait, 0);
    granted := true;
END $$;

-- After an unforeseen QUERY_LIMIT_EXCEEDED: the portal allows less than we thought.
-- Its bucket is treated as full for `p_pause` more seconds, the interval grows by half
-- (up to 60 s) and the burst shrinks to what was in flight when it refused.
CREATE OR REPLACE FUNCTION b24_limit_hit(
    p_member text, p_interval float8, p_burst float8, p_margin float8, p_pause float8)
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    now_ts timestamptz := clock_timestamp();
    r rate_limits%ROWTYPE;
    i float8;
    b float8;
    level float8;
BEGIN
    SELECT * INTO r FROM rate_limits WHERE member_id = p_member FOR UPDATE;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    i := greatest(coalesce(r.interval_s, p_interval), p_interval);
    level := greatest(extract(epoch FROM r.tat - now_ts) / i, 1);
    i := least(i * 1.5, 60);
    b := greatest(least(coalesce(r.burst_n, p_burst), level) - 1, 1);
    UPDATE rate_limits
       SET interval_s = i,
           burst_n = b,
           tat = greatest(r.tat, now_ts + make_interval(
                     secs => p_pause + greatest(b - 1 - p_margin, 0) * i))
     WHERE member_id = p_member;
END $$;

-- An installation's proof in progress: the refresh consumed the offered refresh token,
-- so the pair it returned (sealed) is kept until the installation is stored. A retry
-- of the same claim (a step after the refresh failed for a while) continues with it
-- instead of finding the offered token used. Kept a day at most.
CREATE TABLE IF NOT EXISTS install_proofs (
    offered_refresh_sha256 text PRIMARY KEY,
    member_id              text NOT NULL,
    client_endpoint        text,
    server_endpoint        text,
    access_token           text NOT NULL,
    refresh_token          text NOT NULL,
    expires_in             integer NOT NULL,
    app_status             text,
    created_at             timestamptz NOT NULL DEFAULT now()
);
