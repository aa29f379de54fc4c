-- The console's statements, by name: operator accounts and the audit log
-- (loaded with queries.sql and outbox.sql by mesh/store/queries.py).
-- Full-line comments are stripped before sending; keep them above or between clauses.

-- name: operator_add
-- Nothing returned means the username is taken.
INSERT INTO operators (username, password_hash, role)
VALUES (%(username)s, %(password_hash)s, %(role)s)
ON CONFLICT (username) DO NOTHING
RETURNING username, role, created_at, updated_at;

-- name: operator_add_first
-- Only into an empty table, in one statement: two `tidegate up` racing on one database
-- create one first operator, not two.
INSERT INTO operators (username, password_hash, role)
SELECT %(username)s, %(password_hash)s, %(role)s
WHERE NOT EXISTS (SELECT 1 FROM operators)
ON CONFLICT (username) DO NOTHING
RETURNING username, role, created_at, updated_at;

-- name: operator_get
SELECT username, role, password_hash, created_at, updated_at
FROM operators WHERE username = %(username)s;

-- name: operator_list
SELECT username, role, created_at, updated_at FROM operators ORDER BY username;

-- name: operator_roster
-- What the console checks live sessions against: the tag changes with the password hash,
-- so a new password ends the sessions opened with the old one.
SELECT username, role, md5(password_hash) AS tag FROM operators;

-- name: operator_set_password
UPDATE operators SET password_hash = %(password_hash)s, updated_at = now()
WHERE username = %(username)s
RETURNING username, role, created_at, updated_at;

-- name: operator_remove
DELETE FROM operators WHERE username = %(username)s RETURNING username;

-- name: audit_record
INSERT INTO audit_log (actor, action, target, details)
VALUES (%(actor)s, %(action)s, %(target)s, %(details)s::jsonb);

-- name: audit_list
SELECT id, at, actor, action, target, details
FROM audit_log ORDER BY at DESC, id DESC LIMIT %(limit)s;

-- name: audit_list_before
-- The page after the one that ended with row `before_id`: a keyset, so paging stays cheap
-- however long the log grows.
SELECT id, at, actor, action, target, details
FROM audit_log
WHERE (at, id) < (SELECT b.at, b.id FROM audit_log b WHERE b.id = %(before_id)s)
ORDER BY at DESC, id DESC LIMIT %(limit)s;
