-- W3C Trace Context of the span that wrote the row (the CloudEvents distributed-tracing extension):
-- the relay sends it as the record's `traceparent` / `tracestate` headers, so the consumer's span
-- continues the trace of the request or event that caused the record. NULL: not traced.
ALTER TABLE outbox ADD COLUMN traceparent text, ADD COLUMN tracestate text;
