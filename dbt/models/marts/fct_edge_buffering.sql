-- Edge buffering delay (received_at - timestamp) per site and hour. A site cut off from the cloud keeps
-- events in its retry log and replays them later: its delay jumps, which flags the outage.
select
    site_id || '|' || strftime(event_hour_utc, '%Y-%m-%dT%H') as site_hour,
    site_id,
    event_hour_utc,
    count(*) as events,
    avg(edge_buffering_ms) / 1000.0 as avg_delay_seconds,
    quantile_cont(edge_buffering_ms, 0.5) / 1000.0 as p50_delay_seconds,
    quantile_cont(edge_buffering_ms, 0.95) / 1000.0 as p95_delay_seconds,
    max(edge_buffering_ms) / 1000.0 as max_delay_seconds,
    quantile_cont(edge_buffering_ms, 0.95) / 1000.0 > {{ var('outage_delay_seconds') }} as outage_suspected
from {{ ref('stg_events') }}
group by site_id, event_hour_utc
