"""A partner's runnable examples (docs/partners.md): the Kafka feed and trips, the HTTP feed, a trip over HTTP."""
