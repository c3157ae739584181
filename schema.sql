-- The schema, in numbered steps. Each block below a version marker runs
-- once, in order, when PRAGMA user_version is below its number; add a new
-- block for every change. Times are Unix milliseconds.

-- version 1
CREATE TABLE channels (
	id              INTEGER PRIMARY KEY AUTOINCREMENT, -- never reused: logs refer to ids
	name            TEXT NOT NULL COLLATE NOCASE UNIQUE,
	url             TEXT NOT NULL,
	api_keys        TEXT NOT NULL DEFAULT '[]',  -- JSON array of full keys
	channel_type    TEXT NOT NULL DEFAULT 'anthropic',
	priority        INTEGER NOT NULL DEFAULT 0,
	models          TEXT NOT NULL DEFAULT '[]',  -- JSON array
	model_redirects TEXT NOT NULL DEFAULT '{}',  -- JSON object
	key_strategy    TEXT NOT NULL DEFAULT 'sequential',
	enabled         INTEGER NOT NULL DEFAULT 1,
	created_at      INTEGER NOT NULL,
	updated_at      INTEGER NOT NULL
);

-- One row per cooling scope: the channel (key_index -1, model ''), one key
-- (key_index >= 0), or one model on the channel (model != '').
CREATE TABLE cooldowns (
	channel_id INTEGER NOT NULL REFERENCES channels(id) ON DELETE CASCADE,
	key_index  INTEGER NOT NULL DEFAULT -1,
	model      TEXT NOT NULL DEFAULT '',
	until      INTEGER NOT NULL,
	failures   INTEGER NOT NULL,
	reason     TEXT NOT NULL DEFAULT '',
	status     INTEGER NOT NULL DEFAULT 0,
	PRIMARY KEY (channel_id, key_index, model)
) WITHOUT ROWID;

CREATE TABLE logs (
	id                 INTEGER PRIMARY KEY,
	time               INTEGER NOT NULL,
	token              TEXT NOT NULL DEFAULT '',
	protocol           TEXT NOT NULL DEFAULT '',
	model              TEXT NOT NULL DEFAULT '',
	upstream_model     TEXT NOT NULL DEFAULT '',
	channel_id         INTEGER NOT NULL DEFAULT 0,
	channel_name       TEXT NOT NULL DEFAULT '',
	key_index          INTEGER NOT NULL DEFAULT -1,
	attempts           INTEGER NOT NULL DEFAULT 0,
	status             INTEGER NOT NULL,
	duration_ms        INTEGER NOT NULL DEFAULT 0,
	first_byte_ms      INTEGER NOT NULL DEFAULT 0,
	stream             INTEGER NOT NULL DEFAULT 0,
	input_tokens       INTEGER NOT NULL DEFAULT 0,
	output_tokens      INTEGER NOT NULL DEFAULT 0,
	cache_read_tokens  INTEGER NOT NULL DEFAULT 0,
	cache_write_tokens INTEGER NOT NULL DEFAULT 0,
	client_ip          TEXT NOT NULL DEFAULT '',
	error              TEXT NOT NULL DEFAULT ''
);
CREATE INDEX logs_time ON logs(time);
-- Filtered log pages: an index on one column also orders by rowid (id), so
-- "WHERE channel_id = ? ORDER BY id DESC LIMIT n" reads n entries, not all.
CREATE INDEX logs_channel ON logs(channel_id);
CREATE INDEX logs_model ON logs(model);
-- No index on status: each index costs the writer ~4 us a row, status
-- classes are counted from the rollups, and a status-filtered page walks
-- the newest rows until it has a page.

-- Hourly rollups of the log, written in the same transaction as the rows
-- they count: stats, trends and most log counts read these, so they cost
-- the same at ten requests a day or a million. durations is a sparse
-- histogram of duration_ms (see durationHist) for percentiles.
CREATE TABLE log_hourly (
	hour               INTEGER NOT NULL, -- Unix ms of the hour's start (UTC)
	channel_id         INTEGER NOT NULL,
	model              TEXT NOT NULL,
	channel_name       TEXT NOT NULL,    -- as last logged
	requests           INTEGER NOT NULL,
	ok                 INTEGER NOT NULL, -- 2xx
	client_errors      INTEGER NOT NULL, -- 4xx but 499
	cancelled          INTEGER NOT NULL, -- 499
	server_errors      INTEGER NOT NULL, -- 5xx
	duration_ms        INTEGER NOT NULL, -- sums
	first_byte_ms      INTEGER NOT NULL,
	input_tokens       INTEGER NOT NULL,
	output_tokens      INTEGER NOT NULL,
	cache_read_tokens  INTEGER NOT NULL,
	cache_write_tokens INTEGER NOT NULL,
	durations          BLOB NOT NULL,
	PRIMARY KEY (hour, channel_id, model)
) WITHOUT ROWID;

-- All-time totals of the log by channel, model and status, kept in the
-- writer's transaction: the total of a log page without a time filter sums
-- these few rows instead of counting a year of requests.
CREATE TABLE log_totals (
	channel_id INTEGER NOT NULL,
	model      TEXT NOT NULL,
	status     INTEGER NOT NULL,
	requests   INTEGER NOT NULL,
	PRIMARY KEY (channel_id, model, status)
) WITHOUT ROWID;

-- Admin sessions, by SHA-256 of the token: a stolen database file does not
-- hand out live sessions.
CREATE TABLE sessions (
	token_hash TEXT PRIMARY KEY,
	expires    INTEGER NOT NULL
) WITHOUT ROWID;

CREATE TABLE settings (
	key   TEXT PRIMARY KEY,
	value TEXT NOT NULL
) WITHOUT ROWID;

-- version 2
-- Wave 2 of the request log: who asked (a managed client token), which
-- conversation (a short hash of the session, never the raw id) and whether
-- it stayed on its channel, what it cost (NULL: the model has no price),
-- and every try (README "Request log"): '' when the row itself is the only
-- try, else a compact JSON list (see trace.go).
ALTER TABLE logs ADD COLUMN token_id INTEGER NOT NULL DEFAULT 0;
ALTER TABLE logs ADD COLUMN session TEXT NOT NULL DEFAULT '';
ALTER TABLE logs ADD COLUMN affinity TEXT NOT NULL DEFAULT '';
ALTER TABLE logs ADD COLUMN cost_usd REAL;
ALTER TABLE logs ADD COLUMN tries TEXT NOT NULL DEFAULT '';

-- version 3
-- Sessions are bound to the admin password they were opened under (a
-- fingerprint of it, never the password): a new password ends them all.
-- Rows from before have no fingerprint and end too.
ALTER TABLE sessions ADD COLUMN pass_fp TEXT NOT NULL DEFAULT '';

-- version 4
-- Client tokens managed in the admin (README "Client tokens"), by SHA-256
-- of the token: the secret itself is shown once, at creation. models and
-- channels are allowlists (empty: all); limits a JSON object of
-- daily_usd, monthly_usd, total_usd, concurrency, rpm (absent: none).
CREATE TABLE tokens (
	id         INTEGER PRIMARY KEY AUTOINCREMENT, -- never reused: logs refer to ids
	name       TEXT NOT NULL COLLATE NOCASE UNIQUE,
	token_hash TEXT NOT NULL UNIQUE,
	hint       TEXT NOT NULL DEFAULT '',
	enabled    INTEGER NOT NULL DEFAULT 1,
	expires_at INTEGER,                  -- NULL: never
	models     TEXT NOT NULL DEFAULT '[]',
	channels   TEXT NOT NULL DEFAULT '[]',
	limits     TEXT NOT NULL DEFAULT '{}',
	created_at INTEGER NOT NULL,
	updated_at INTEGER NOT NULL
);
-- A token's spend and requests, written by the log writer in the same
-- transaction as the rows they count. Money in pico-dollars (1e-12 USD);
-- day (YYYYMMDD) and month (YYYYMM) are the CCLOAD_TZ periods spent_day
-- and spent_month count. No foreign key: the writer skips rows of a
-- deleted token instead of failing its batch.
CREATE TABLE token_usage (
	token_id    INTEGER PRIMARY KEY,
	day         INTEGER NOT NULL,
	spent_day   INTEGER NOT NULL,
	month       INTEGER NOT NULL,
	spent_month INTEGER NOT NULL,
	spent_total INTEGER NOT NULL,
	requests    INTEGER NOT NULL,
	last_used   INTEGER NOT NULL
) WITHOUT ROWID;
-- Hourly rollups by token, beside log_hourly (by channel and model), for
-- stats and trends per token.
CREATE TABLE token_hourly (
	hour               INTEGER NOT NULL,
	token_id           INTEGER NOT NULL,
	token              TEXT NOT NULL, -- name as last logged
	requests           INTEGER NOT NULL,
	ok                 INTEGER NOT NULL,
	duration_ms        INTEGER NOT NULL, -- sum
	input_tokens       INTEGER NOT NULL,
	output_tokens      INTEGER NOT NULL,
	cache_read_tokens  INTEGER NOT NULL,
	cache_write_tokens INTEGER NOT NULL,
	cost_pico          INTEGER NOT NULL,
	unpriced           INTEGER NOT NULL,
	PRIMARY KEY (hour, token_id)
) WITHOUT ROWID;
CREATE INDEX logs_token ON logs(token_id);
-- What each request cost, summed exactly (pico-dollars), and how many had
-- no price.
ALTER TABLE log_hourly ADD COLUMN cost_pico INTEGER NOT NULL DEFAULT 0;
ALTER TABLE log_hourly ADD COLUMN unpriced INTEGER NOT NULL DEFAULT 0;
-- A reseller selling at 30% of list sets 0.3.
ALTER TABLE channels ADD COLUMN price_multiplier REAL NOT NULL DEFAULT 1;

-- version 5
-- Several replicas (cluster.go): for each shared config item, the form this
-- replica last agreed with Redis on (NULL: deleted) and its revision there.
-- A local item that differs from its row was edited here and is pushed; a
-- different revision in Redis is pulled.
CREATE TABLE cluster_items (
	kind TEXT NOT NULL,
	id   INTEGER NOT NULL,
	rev  INTEGER NOT NULL,
	data TEXT,
	PRIMARY KEY (kind, id)
) WITHOUT ROWID;
