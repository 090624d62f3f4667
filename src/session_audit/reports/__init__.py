"""Reports API v2 (seed 002): definitions, on-demand and scheduled reports, downloads.

requests -> store, composed by service; filters is the query_filter language, types the twelve
predefined report queries, generate/render/pdf produce downloads, scheduler/periods turn
subscriptions into reports."""
