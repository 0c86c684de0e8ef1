-- One row per archived event, with the two delays the marts use: edge buffering (queued_at - received_at,
-- the time an event spent inside the site: MQTT, the edge service and its retry log, until SQS accepted it)
-- and the device's own delay to the forwarder (received_at - timestamp, on the device's clock).
-- An event is identified by (site_id, event_id): an event id is unique only within its site. event_key
-- is that pair as one string, as the pipeline writes it (partners see it as the webhook-id).
{% set archive = source('archive', 'events') %}
{% set pattern = archive_path('year=*/month=*/day=*/hour=*/*.parquet') %}
{% set columns = [
    ('event_id', 'varchar'), ('idempotency_key', 'varchar'), ('schema_version', 'varchar'),
    ('event_type', 'varchar'), ('source', 'varchar'), ('site_id', 'varchar'), ('device_id', 'varchar'),
    ('timestamp', 'timestamptz'), ('received_at', 'timestamptz'), ('queued_at', 'timestamptz'),
    ('ingested_at', 'timestamptz'), ('payload', 'varchar'),
] %}
with archived as (
    {% if files_exist(pattern) %}
    select {{ columns_or_null(columns, parquet_columns(pattern)) }} from {{ archive }}
    {% else %}
    {{ empty_relation(columns) }}
    {% endif %}
)

select
    site_id || '/' || event_id as event_key,
    event_id,
    idempotency_key,
    schema_version,
    event_type,
    source,
    site_id,
    device_id,
    "timestamp" as event_at,
    received_at,
    queued_at,
    ingested_at,
    date_trunc('hour', "timestamp" at time zone 'UTC') as event_hour_utc,
    -- Null for events archived before queued_at was recorded.
    epoch_ms(queued_at) - epoch_ms(received_at) as edge_buffering_ms,
    epoch_ms(received_at) - epoch_ms("timestamp") as device_delay_ms,
    payload
from archived
