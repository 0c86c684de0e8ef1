"""Ingresses: each device family's own protocol in front of the forwarder, one module per protocol.

- `zigbee`: zigbee2mqtt's MQTT topics, acked by hand once the site broker has the envelope;
- `http`: Hikvision ISAPI event notifications (NVRs) and the door-access system's signed webhooks, on
  one HTTP server, answered 2xx only once the envelope is at the site broker (or quarantined);
- `sia`: SIA DC-09 over TCP from Ajax hubs, ACKed on the same terms.

Each one answers its device only by what `Forwarder` said (`Outcome`): received (FORWARDED or
QUARANTINED) or not (FAILED: no ack, a 503, no answer), so the device keeps and resends what the site
has not got. Each refuses what it cannot read with its protocol's own refusal and a quarantine entry.
"""
