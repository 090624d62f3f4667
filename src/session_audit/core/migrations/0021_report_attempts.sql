-- How many times generation of a report has started. Counted on a second connection and
-- committed before the generating transaction builds anything, so an attempt that kills its
-- process (out of memory, a crash) is still counted when the transaction rolls back; after
-- MAX_ATTEMPTS the report is marked failed instead of taking down every process in turn.
-- No foreign key: inserting one would need a KEY SHARE lock on the report row, which the
-- generating transaction holds FOR UPDATE. Rows go when the report is ready or failed.
CREATE TABLE report_attempts (
    report_id bigint PRIMARY KEY,
    attempts  int    NOT NULL
);
