-- One row per webhook delivery attempt, as logged by the partner delivery workers.
{% set attempts = source('routing', 'delivery_attempts') %}
{% set columns = [
    ('event_id', 'varchar'), ('partner', 'varchar'), ('attempt', 'integer'),
    ('attempted_at', 'timestamptz'), ('status_code', 'integer'), ('latency_ms', 'double'),
    ('outcome', 'varchar'), ('error', 'varchar'),
] %}
with attempts as (
    {% if files_exist(archive_path('delivery_attempts/date=*/*.parquet')) %}
    select {% for name, _ in columns %}{{ name }}{{ ", " if not loop.last }}{% endfor %} from {{ attempts }}
    {% else %}
    {{ empty_relation(columns) }}
    {% endif %}
)

select
    event_id,
    partner,
    attempt,
    attempted_at,
    cast(attempted_at at time zone 'UTC' as date) as attempted_date_utc,
    status_code,
    latency_ms,
    outcome,
    error
from attempts
