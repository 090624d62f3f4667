"""Analytics: the session report (seed 000), the histogram (seed 003) and statistics.

requests -> store -> rows, composed by service; `q` is the histogram's filter language, timebins
the calendar-aware bins, fields the whitelist of filterable/groupable fields. `rollups` is the
one module other domains may call: sessions ingest maintains the rollups in its transaction."""
