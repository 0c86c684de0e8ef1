-- Priority-queue latency (enqueued -> handled) per priority and hour, against each tier's target:
-- high < 1 s (user-facing), medium < 10 s (business logic), low is best effort.
with targets as (
    select * from (values ('high', 1000.0), ('medium', 10000.0), ('low', null)) as t(priority, target_ms)
)

select
    h.priority || '|' || strftime(h.handled_hour_utc, '%Y-%m-%dT%H') as priority_hour,
    h.priority,
    h.handled_hour_utc,
    count(*) as events,
    quantile_cont(h.latency_ms, 0.5) as p50_latency_ms,
    quantile_cont(h.latency_ms, 0.95) as p95_latency_ms,
    max(h.latency_ms) as max_latency_ms,
    any_value(t.target_ms) as target_ms,
    case when any_value(t.target_ms) is null then null
         else count(*) filter (where h.latency_ms <= t.target_ms) / count(*) end as within_target_rate
from {{ ref('stg_priority_handled') }} as h
left join targets as t using (priority)
group by h.priority, h.handled_hour_utc
