-- What each partner received: one row per webhook-id a partner accepted, with the contract version and
-- the SHA-256 of the body it accepted first (a partner that de-duplicates by webhook-id keeps that one),
-- and how many attempts it took. `pipeline.audit` re-creates any of these bodies from the archive.
-- A webhook-id delivered more than once (an archive-range replay, SQS's at-least-once) shows it in
-- `deliveries`, and a replay under a newer contract in `contract_versions` / `distinct_bodies`.
with attempts as (
    select * from {{ ref('stg_delivery_attempts') }}
),

per_webhook as (
    select
        partner,
        webhook_id,
        any_value(site_id) as site_id,
        any_value(event_id) as event_id,
        min(attempted_at) as first_attempt_at,
        max(attempted_at) as last_attempt_at,
        count(*) as attempts,
        count(*) filter (where outcome = 'delivered') as deliveries,
        min(attempted_at) filter (where outcome = 'delivered') as first_delivered_at,
        arg_min(contract_version, attempted_at) filter (where outcome = 'delivered') as contract_version,
        arg_min(body_sha256, attempted_at) filter (where outcome = 'delivered') as body_sha256,
        arg_min(body_bytes, attempted_at) filter (where outcome = 'delivered') as body_bytes,
        arg_min(webhook_timestamp, attempted_at) filter (where outcome = 'delivered') as webhook_timestamp,
        count(distinct contract_version) filter (where outcome = 'delivered') as contract_versions,
        count(distinct body_sha256) filter (where outcome = 'delivered') as distinct_bodies
    from attempts
    group by partner, webhook_id
)

select
    partner || '|' || webhook_id as partner_webhook,
    *
from per_webhook
where deliveries > 0
