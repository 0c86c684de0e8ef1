-- Edge buffering per site and hour: how long events stayed inside the site (queued_at - received_at:
-- MQTT, the edge service and its retry log) before SQS accepted them. A site cut off from SQS keeps
-- events in its retry log and replays them later: its delay jumps, which flags the outage. The device's
-- own delay to the forwarder (received_at - timestamp) is kept beside it; it does not see such a cut.
select
    site_id || '|' || strftime(event_hour_utc, '%Y-%m-%dT%H') as site_hour,
    site_id,
    event_hour_utc,
    count(*) as events,
    count(edge_buffering_ms) as events_with_queued_at,
    avg(edge_buffering_ms) / 1000.0 as avg_delay_seconds,
    quantile_cont(edge_buffering_ms, 0.5) / 1000.0 as p50_delay_seconds,
    quantile_cont(edge_buffering_ms, 0.95) / 1000.0 as p95_delay_seconds,
    max(edge_buffering_ms) / 1000.0 as max_delay_seconds,
    quantile_cont(device_delay_ms, 0.95) / 1000.0 as p95_device_delay_seconds,
    quantile_cont(edge_buffering_ms, 0.95) / 1000.0 > {{ var('outage_delay_seconds') }} as outage_suspected
from {{ ref('stg_events') }}
group by site_id, event_hour_utc
