-- wxauth's PostgreSQL schema, version 1. Which rule each constraint and each
-- conditional statement enforces: docs/ARCHITECTURE.md, "PostgreSQL".

-- User ids: handed out once, never reused (a sequence never goes back; a login that
-- loses the race for its openid leaves a gap, which is fine).
CREATE SEQUENCE wxauth_user_ids AS bigint START 1;

CREATE TABLE wxauth_users (
    id                bigint  PRIMARY KEY,
    appid             text    NOT NULL,
    openid            text    NOT NULL,
    unionid           text,
    session_key       text    NOT NULL,
    created_at        bigint  NOT NULL,
    last_login_at     bigint  NOT NULL,
    disabled          boolean NOT NULL DEFAULT false,
    token_stamp       bigint  NOT NULL DEFAULT 0,
    tokens_not_before bigint  NOT NULL DEFAULT 0,
    -- JSON: phone_number, pure_phone_number, country_code.
    phone             text
);

-- One user per (appid, openid), however many nodes see its first login at once:
-- a login claims this key before it creates the user.
CREATE TABLE wxauth_user_openids (
    appid   text   NOT NULL,
    openid  text   NOT NULL,
    user_id bigint NOT NULL REFERENCES wxauth_users (id) DEFERRABLE INITIALLY DEFERRED,
    PRIMARY KEY (appid, openid)
);

-- With wechat.link_by_unionid: one user per unionid.
CREATE TABLE wxauth_user_unionids (
    unionid text   PRIMARY KEY,
    user_id bigint NOT NULL REFERENCES wxauth_users (id) DEFERRABLE INITIALLY DEFERRED
);

-- One row per login; a user's families are one index range.
CREATE TABLE wxauth_families (
    user_id    bigint NOT NULL,
    family_id  bytea  NOT NULL CHECK (octet_length(family_id) = 16),
    generation bigint NOT NULL CHECK (generation >= 1),
    created_ms bigint NOT NULL,
    rotated_ms bigint NOT NULL,
    exp        bigint NOT NULL,
    revoked_ms bigint,
    -- The user's token stamp when the login started it (not a rule the store applies).
    stamp      bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (user_id, family_id)
);
CREATE INDEX wxauth_families_exp ON wxauth_families (exp);

-- The rest of the embedded store's key spaces, as they are there: `meta` (the
-- storage format, each app's WeChat access token) and, from a restored backup of an
-- older release, the per-token refresh records read only to upgrade them.
CREATE TABLE wxauth_kv (
    tree  text  NOT NULL,
    key   bytea NOT NULL,
    value bytea NOT NULL,
    PRIMARY KEY (tree, key)
);

-- One holder at a time of a named job across nodes: the refresh of an app's WeChat
-- access token (`lease:access_token:<appid>`).
CREATE TABLE wxauth_leases (
    name     text   PRIMARY KEY,
    holder   text   NOT NULL,
    until_ms bigint NOT NULL
);
