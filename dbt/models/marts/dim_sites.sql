-- Every site that has sent an event: the anchor for the per-site marts' relationship tests.
select
    site_id,
    min(event_at) as first_event_at,
    max(event_at) as last_event_at,
    count(*) as events_total,
    count(distinct device_id) as devices
from {{ ref('stg_events') }}
group by site_id
