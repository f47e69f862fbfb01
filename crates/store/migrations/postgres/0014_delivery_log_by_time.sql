-- The delivery log read without a filter, newest first, page by page
-- (`GET /v1/webhooks/deliveries`): an index instead of sorting the table.
CREATE INDEX webhook_deliveries_by_time ON webhook_deliveries (created_at, id);
