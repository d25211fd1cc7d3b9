-- The user's profile (PATCH /api/weixin/user/) and deletion (users.deletion_delay).
ALTER TABLE wxauth_users
    ADD COLUMN nickname     text,
    ADD COLUMN avatar_url   text,
    -- Marked for deletion: erased at this unix second unless a login comes first.
    ADD COLUMN deletion_due bigint,
    -- Erased at this unix second: the row keeps the id taken, no personal data.
    ADD COLUMN erased_at    bigint;

-- The sweep's question (which marks are due) reads only the marked rows.
CREATE INDEX wxauth_users_deletion_due ON wxauth_users (deletion_due)
    WHERE deletion_due IS NOT NULL;
