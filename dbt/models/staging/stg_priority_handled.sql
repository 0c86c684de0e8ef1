-- One row per event handled by a priority-queue consumer (high / medium / low).
{% set handled = source('routing', 'priority_handled') %}
{% set columns = [
    ('event_id', 'varchar'), ('event_type', 'varchar'), ('site_id', 'varchar'), ('priority', 'varchar'),
    ('enqueued_at', 'timestamptz'), ('handled_at', 'timestamptz'), ('latency_ms', 'double'),
] %}
with handled as (
    {% if files_exist(archive_path('priority_handled/date=*/*.parquet')) %}
    select {% for name, _ in columns %}{{ name }}{{ ", " if not loop.last }}{% endfor %} from {{ handled }}
    {% else %}
    {{ empty_relation(columns) }}
    {% endif %}
)

select
    event_id,
    event_type,
    site_id,
    priority,
    enqueued_at,
    handled_at,
    date_trunc('hour', handled_at at time zone 'UTC') as handled_hour_utc,
    latency_ms
from handled
