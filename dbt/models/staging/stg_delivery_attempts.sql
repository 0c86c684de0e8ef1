-- One row per webhook delivery attempt, as logged by the partner delivery workers, with what was sent:
-- the body's SHA-256 and size, the webhook-id, the contract version and the signature timestamp.
{% set attempts = source('routing', 'delivery_attempts') %}
{% set pattern = archive_path('delivery_attempts/date=*/*.parquet') %}
{% set columns = [
    ('event_id', 'varchar'), ('partner', 'varchar'), ('attempt', 'integer'),
    ('attempted_at', 'timestamptz'), ('status_code', 'integer'), ('latency_ms', 'double'),
    ('outcome', 'varchar'), ('error', 'varchar'),
    ('webhook_id', 'varchar'), ('site_id', 'varchar'), ('contract_version', 'varchar'),
    ('body_sha256', 'varchar'), ('body_bytes', 'bigint'), ('webhook_timestamp', 'timestamptz'),
    ('archive_hour', 'varchar'),
] %}
with attempts as (
    {% if files_exist(pattern) %}
    select {{ columns_or_null(columns, parquet_columns(pattern)) }} from {{ attempts }}
    {% else %}
    {{ empty_relation(columns) }}
    {% endif %}
)

select
    -- Rows logged before the webhook-id was recorded fall back to the event id they were sent under.
    coalesce(webhook_id, event_id) as webhook_id,
    event_id,
    site_id,
    partner,
    attempt,
    attempted_at,
    cast(attempted_at at time zone 'UTC' as date) as attempted_date_utc,
    status_code,
    latency_ms,
    outcome,
    error,
    contract_version,
    body_sha256,
    body_bytes,
    webhook_timestamp,
    archive_hour
from attempts
