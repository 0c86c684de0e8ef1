-- Partner delivery SLA and success rate per partner and day (UTC) of the first attempt.
-- A delivery is one webhook-id (site_id/event_id: two sites may share an event id); it is a success if
-- any attempt delivered it, and on time if that was within partner_sla_seconds of its first attempt.
with per_webhook as (
    select
        partner,
        webhook_id,
        min(attempted_at) as first_attempt_at,
        min(attempted_at) filter (where outcome = 'delivered') as delivered_at,
        count(*) as attempts,
        bool_or(outcome = 'dead_lettered') as dead_lettered,
        avg(latency_ms) as avg_latency_ms
    from {{ ref('stg_delivery_attempts') }}
    group by partner, webhook_id
)

select
    partner || '|' || strftime(cast(first_attempt_at at time zone 'UTC' as date), '%Y-%m-%d') as partner_day,
    partner,
    cast(first_attempt_at at time zone 'UTC' as date) as delivery_date_utc,
    count(*) as events,
    count(delivered_at) as delivered_events,
    count(*) filter (where dead_lettered and delivered_at is null) as dead_lettered_events,
    sum(attempts) as attempts,
    count(delivered_at) / count(*) as success_rate,
    count(*) filter (where date_diff('second', first_attempt_at, delivered_at) <= {{ var('partner_sla_seconds') }}) / count(*) as sla_met_rate,
    avg(avg_latency_ms) as avg_latency_ms
from per_webhook
group by all
