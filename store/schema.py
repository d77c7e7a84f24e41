"""The store's tables and views, its version table and the migrations between versions.

A store records `SCHEMA_VERSION` in `schema_version`. Opening a store for writing applies every migration
above the recorded version, in one transaction; readers refuse a store whose version differs, so no query
ever runs against a half-known schema. Views are recreated on every writing open, so a fixed view reaches
old stores without a version bump.
"""

from __future__ import annotations

# Child tables carry no keys or indexes: rows arrive in bulk once per run, and DuckDB's zone maps make
# `WHERE run_id = ...` fast without an index (see docs/store.md for the measured figures).
_TABLES_V1 = [
    """CREATE TABLE runs (
        run_id VARCHAR NOT NULL, created_at TIMESTAMP, finished_at TIMESTAMP,
        spec_json VARCHAR, spec VARCHAR, model VARCHAR, dtype VARCHAR, device VARCHAR, hardware VARCHAR,
        status VARCHAR NOT NULL, error VARCHAR, prompt VARCHAR, prompt_is_chat BOOLEAN, n_prompt_tokens INTEGER,
        n_new_tokens INTEGER, tok_per_s DOUBLE, decode_tok_per_s DOUBLE, ttft_s DOUBLE, total_s DOUBLE,
        target_forwards INTEGER, mean_accepted_length DOUBLE, acceptance_rate DOUBLE,
        acceptance_per_position DOUBLE[], nodes_drafted INTEGER, tokens_accepted INTEGER,
        draft_s DOUBLE, verify_s DOUBLE, prefill_s DOUBLE, accept_s DOUBLE,
        cache_bytes BIGINT, peak_cache_bytes BIGINT, weight_bytes BIGINT, finish_reason VARCHAR, text VARCHAR
    )""",
    """CREATE TABLE steps (
        run_id VARCHAR NOT NULL, step INTEGER NOT NULL, draft_ns BIGINT, verify_ns BIGINT, accept_ns BIGINT,
        elapsed_ns BIGINT, nodes_drafted INTEGER, tokens_accepted INTEGER, bonus_token BOOLEAN,
        n_tokens INTEGER, cache_bytes BIGINT, cache_tokens BIGINT, text VARCHAR, finish_reason VARCHAR
    )""",
    """CREATE TABLE tokens (
        run_id VARCHAR NOT NULL, position INTEGER NOT NULL, token_id INTEGER NOT NULL, text VARCHAR,
        source VARCHAR NOT NULL, logprob DOUBLE, entropy DOUBLE, step INTEGER
    )""",
    """CREATE TABLE draft_nodes (
        run_id VARCHAR NOT NULL, step INTEGER NOT NULL, node INTEGER NOT NULL, parent INTEGER NOT NULL,
        token_id INTEGER, depth INTEGER, draft_prob DOUBLE, target_prob DOUBLE, accepted BOOLEAN
    )""",
    """CREATE TABLE cache_stats (
        run_id VARCHAR NOT NULL, step INTEGER NOT NULL, layer INTEGER NOT NULL, head INTEGER,
        tokens_held INTEGER, bytes BIGINT, bits DOUBLE, sparsity DOUBLE
    )""",
]

# version -> statements that bring a store from version - 1 to it. Append; never edit a released entry.
MIGRATIONS: dict[int, list[str]] = {
    1: _TABLES_V1,
    2: [  # whether the spec keeps the target's distribution; chain acceptance against its prediction
        "ALTER TABLE runs ADD COLUMN lossless BOOLEAN",
        "ALTER TABLE runs ADD COLUMN alpha DOUBLE",
        "ALTER TABLE runs ADD COLUMN predicted_tokens_per_step DOUBLE",
        "ALTER TABLE runs ADD COLUMN tokens_per_step DOUBLE",
    ],
    3: [  # per-head KV-cache stats: the logical positions kept (sampled, bounded) and whether masks are simulated
        "ALTER TABLE cache_stats ADD COLUMN kept INTEGER[]",
        "ALTER TABLE cache_stats ADD COLUMN simulated BOOLEAN",
    ],
    4: [  # simulated speed, warm starts, the cache's live bytes beside its allocated bytes, provenance (JSON)
        "ALTER TABLE runs ADD COLUMN simulated VARCHAR[]",
        "ALTER TABLE runs ADD COLUMN warm_start BOOLEAN",
        "ALTER TABLE runs ADD COLUMN cache_live_bytes BIGINT",
        "ALTER TABLE runs ADD COLUMN peak_cache_live_bytes BIGINT",
        "ALTER TABLE runs ADD COLUMN provenance VARCHAR",
        "ALTER TABLE steps ADD COLUMN cache_live_bytes BIGINT",
    ],
    5: [  # what a user should know about a run (a cache budget the context never reaches, ...): summary's warnings
        "ALTER TABLE runs ADD COLUMN warnings VARCHAR[]",
    ],
    6: [  # two-tier caches (ShadowKV, LServe with offload): bytes held off the fast tier, and the traffic back
        "ALTER TABLE runs ADD COLUMN cache_off_bytes BIGINT",
        "ALTER TABLE runs ADD COLUMN peak_cache_off_bytes BIGINT",
        "ALTER TABLE runs ADD COLUMN cache_moved_bytes BIGINT",
        "ALTER TABLE runs ADD COLUMN cache_moved_s DOUBLE",
        "ALTER TABLE steps ADD COLUMN cache_off_bytes BIGINT",
    ],
    7: [  # sweeps (workbench/sweep/): a grid's cells, each keyed by spec, prompt, seed, length and model
        """CREATE TABLE sweeps (
            sweep_id VARCHAR NOT NULL, name VARCHAR, created_at TIMESTAMP, n_cells INTEGER, grid VARCHAR
        )""",
        """CREATE TABLE sweep_cells (
            sweep_id VARCHAR NOT NULL, cell_key VARCHAR NOT NULL, run_id VARCHAR, spec VARCHAR, prompt VARCHAR,
            seed INTEGER, repeat INTEGER, status VARCHAR NOT NULL, error VARCHAR, worker VARCHAR,
            finished_at TIMESTAMP
        )""",
    ],
    8: [  # where a run departs from greedy plain decoding (workbench/divergence.py), and the target's perplexity
        "ALTER TABLE runs ADD COLUMN departures INTEGER",
        "ALTER TABLE runs ADD COLUMN departure_rate DOUBLE",
        "ALTER TABLE runs ADD COLUMN target_perplexity DOUBLE",
        "ALTER TABLE tokens ADD COLUMN target_argmax INTEGER",
    ],
    9: [  # the target forwards a drafter runs itself (search expansions, lookaheads), beside the verifications
        "ALTER TABLE runs ADD COLUMN drafter_forwards INTEGER",
        "ALTER TABLE runs ADD COLUMN tokens_per_target_forward DOUBLE",
        "ALTER TABLE steps ADD COLUMN drafter_forwards INTEGER",
    ],
}
SCHEMA_VERSION = max(MIGRATIONS)

TABLES = ("runs", "steps", "tokens", "draft_nodes", "cache_stats")
SWEEP_TABLES = ("sweeps", "sweep_cells")  # queryable; not part of a run's Parquet export

# A technique list in spec_json ([{"name": ..., "params": {...}}]) as the short string `name:k=v,...+name`.
_TECHNIQUES = """coalesce(array_to_string(list_transform(
        from_json(json_extract(spec_json, '$.{field}'), '[{{"name": "VARCHAR", "params": "MAP(VARCHAR, VARCHAR)"}}]'),
        lambda t: t.name || CASE WHEN cardinality(t.params) = 0 THEN '' ELSE ':' || array_to_string(list_transform(
            map_entries(t.params), lambda e: e.key || '=' || e.value), ',') END), '+'), '')"""

_ONE_TECHNIQUE = """CASE WHEN json_extract(spec_json, '$.{field}') IS NULL
        OR json_type(json_extract(spec_json, '$.{field}')) = 'NULL' THEN NULL
        ELSE json_extract_string(spec_json, '$.{field}.name') || coalesce(NULLIF(':' || array_to_string(
            list_transform(map_entries(from_json(json_extract(spec_json, '$.{field}.params'),
            '"MAP(VARCHAR, VARCHAR)"')), lambda e: e.key || '=' || e.value), ','), ':'), '') END"""

# provenance's backends ({operation: backend}) as one sortable string `operation=backend,...`, for GROUP BY.
_BACKENDS = """CASE WHEN json_type(json_extract(provenance, '$.backends')) = 'OBJECT' THEN array_to_string(list_sort(
        list_transform(map_entries(from_json(json_extract(provenance, '$.backends'), '"MAP(VARCHAR, VARCHAR)"')),
        lambda e: e.key || '=' || e.value)), ',') END"""

VIEWS = [
    f"""CREATE OR REPLACE VIEW run_summary AS SELECT
        run_id, created_at, status, model, dtype, device, hardware,
        json_extract_string(spec_json, '$.decode.name') AS decode_name,
        {_ONE_TECHNIQUE.format(field='decode')} AS decode,
        {_ONE_TECHNIQUE.format(field='accept')} AS accept,
        {_TECHNIQUES.format(field='cache')} AS cache,
        {_TECHNIQUES.format(field='compress')} AS compress,
        CAST(json_extract(spec_json, '$.temperature') AS DOUBLE) AS temperature,
        CAST(json_extract(spec_json, '$.max_new_tokens') AS INTEGER) AS max_new_tokens,
        spec, prompt, n_prompt_tokens, n_new_tokens, tok_per_s, decode_tok_per_s, ttft_s, total_s,
        target_forwards, mean_accepted_length, acceptance_rate, cache_bytes, peak_cache_bytes, weight_bytes,
        finish_reason, lossless, alpha, predicted_tokens_per_step, tokens_per_step,
        simulated, warm_start, cache_live_bytes, peak_cache_live_bytes, provenance, warnings,
        cache_off_bytes, peak_cache_off_bytes, cache_moved_bytes, cache_moved_s,
        departures, departure_rate, target_perplexity, drafter_forwards, tokens_per_target_forward,
        json_extract_string(provenance, '$.commit') AS commit,
        {_BACKENDS} AS backend
    FROM runs""",
    # Matching rule (docs/store.md): a run is compared with the finished plain runs (plain decoding, no
    # acceptor override, no cache policy, no compression) of the same prompt, model, dtype, device,
    # hardware, temperature and max_new_tokens; their metrics are averaged.
    """CREATE OR REPLACE VIEW technique_comparison AS
    WITH done AS (SELECT * FROM run_summary WHERE status = 'done'),
    baseline AS (
        SELECT prompt, model, dtype, device, hardware, temperature, max_new_tokens,
               count(*) AS baseline_runs, avg(tok_per_s) AS baseline_tok_per_s,
               avg(mean_accepted_length) AS baseline_mean_accepted_length
        FROM done WHERE decode = 'plain' AND accept IS NULL AND cache = '' AND compress = ''
        GROUP BY ALL)
    SELECT d.prompt, d.model, d.dtype, d.device, d.hardware, d.temperature, d.max_new_tokens,
           d.decode, d.accept, d.cache, d.compress, count(*) AS runs,
           avg(d.tok_per_s) AS tok_per_s, avg(d.mean_accepted_length) AS mean_accepted_length,
           avg(d.acceptance_rate) AS acceptance_rate,
           any_value(b.baseline_runs) AS baseline_runs, any_value(b.baseline_tok_per_s) AS baseline_tok_per_s,
           avg(d.tok_per_s) / any_value(b.baseline_tok_per_s) AS speedup,
           avg(d.mean_accepted_length) / any_value(b.baseline_mean_accepted_length) AS accepted_length_ratio
    FROM done d LEFT JOIN baseline b
      ON d.prompt = b.prompt AND d.model = b.model AND d.dtype = b.dtype AND d.device = b.device
     AND d.hardware = b.hardware AND d.temperature = b.temperature AND d.max_new_tokens = b.max_new_tokens
    GROUP BY d.prompt, d.model, d.dtype, d.device, d.hardware, d.temperature, d.max_new_tokens,
             d.decode, d.accept, d.cache, d.compress""",
    # A sweep's cells by configuration: how many finished or failed, and the mean metrics of the finished
    # ones (a cell counts once, its latest record; a re-run sweep adds only the cells it ran).
    """CREATE OR REPLACE VIEW sweep_summary AS
    WITH latest AS (
        SELECT * FROM sweep_cells QUALIFY row_number() OVER (PARTITION BY sweep_id, cell_key
                                                             ORDER BY finished_at DESC) = 1)
    SELECT c.sweep_id, any_value(s.name) AS sweep_name, c.spec, count(*) AS cells,
           count(*) FILTER (WHERE c.status = 'done') AS done, count(*) FILTER (WHERE c.status = 'failed') AS failed,
           avg(r.tok_per_s) AS tok_per_s, avg(r.decode_tok_per_s) AS decode_tok_per_s,
           avg(r.mean_accepted_length) AS mean_accepted_length, avg(r.n_new_tokens) AS n_new_tokens,
           avg(r.peak_cache_bytes) AS peak_cache_bytes, avg(r.weight_bytes) AS weight_bytes,
           bool_and(r.lossless) AS lossless
    FROM latest c LEFT JOIN sweeps s USING (sweep_id)
    LEFT JOIN run_summary r ON r.run_id = c.run_id AND c.status = 'done'
    GROUP BY c.sweep_id, c.spec""",
]
VIEW_NAMES = ("run_summary", "technique_comparison", "sweep_summary")
