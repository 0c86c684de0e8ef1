-- One row per archived event, with the edge buffering delay (received_at - timestamp) the marts use.
-- An event is identified by (site_id, event_id): an event id is unique only within its site. event_key
-- is that pair as one string, as the pipeline writes it (partners see it as the webhook-id).
{% set archive = source('archive', 'events') %}
{% set columns = [
    ('event_id', 'varchar'), ('idempotency_key', 'varchar'), ('schema_version', 'varchar'),
    ('event_type', 'varchar'), ('source', 'varchar'), ('site_id', 'varchar'), ('device_id', 'varchar'),
    ('timestamp', 'timestamptz'), ('received_at', 'timestamptz'), ('ingested_at', 'timestamptz'),
    ('payload', 'varchar'),
] %}
with archived as (
    {% if files_exist(archive_path('year=*/month=*/day=*/hour=*/*.parquet')) %}
    select {% for name, _ in columns %}{{ name }}{{ ", " if not loop.last }}{% endfor %} from {{ archive }}
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
    ingested_at,
    date_trunc('hour', "timestamp" at time zone 'UTC') as event_hour_utc,
    epoch_ms(received_at) - epoch_ms("timestamp") as edge_buffering_ms,
    payload
from archived
