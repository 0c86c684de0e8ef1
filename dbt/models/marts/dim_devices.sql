-- Device last-seen and health. Health is judged against the newest event in the archive rather than the
-- wall clock, so rebuilding over historical data gives the answer as of then.
with as_of as (
    select max(event_at) as as_of from {{ ref('stg_events') }}
),

per_device as (
    select
        site_id,
        device_id,
        any_value(source) as source,
        min(event_at) as first_seen_at,
        max(event_at) as last_seen_at,
        arg_max(event_type, event_at) as last_event_type,
        count(*) as events_total
    from {{ ref('stg_events') }}
    group by site_id, device_id
)

select
    site_id || '/' || device_id as device_key,
    per_device.*,
    date_diff('minute', last_seen_at, as_of.as_of) as minutes_since_seen,
    case
        when date_diff('minute', last_seen_at, as_of.as_of) <= {{ var('healthy_within_minutes') }} then 'healthy'
        when date_diff('minute', last_seen_at, as_of.as_of) <= {{ var('stale_within_minutes') }} then 'stale'
        else 'silent'
    end as health
from per_device
cross join as_of
