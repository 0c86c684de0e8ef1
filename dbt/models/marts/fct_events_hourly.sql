-- Events per site, event type and hour of event time (UTC).
select
    site_id || '|' || event_type || '|' || strftime(event_hour_utc, '%Y-%m-%dT%H') as site_type_hour,
    site_id,
    event_type,
    event_hour_utc,
    count(*) as events,
    count(distinct device_id) as devices
from {{ ref('stg_events') }}
group by site_id, event_type, event_hour_utc
