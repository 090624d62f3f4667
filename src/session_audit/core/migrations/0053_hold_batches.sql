-- Legal holds over many sessions (issue 15, docs/retention.md "Holds over millions"): a hold
-- locks the sessions its filter matches in batches, one short transaction per window of the
-- org's sessions in id order, instead of one transaction over all of them. While `applying`,
-- `applied_through` is the last session id of the windows done; the request that made the hold
-- works through the windows for as long as its deadline allows; any server's retention task
-- finishes the rest once nobody has applied a window for a while (`touched_at`), and every
-- purge of the org finishes it before deleting anything. Holds made before this migration were
-- applied whole: not applying. One subcommand per ALTER (Citus).
ALTER TABLE retention_holds ADD COLUMN applying boolean NOT NULL DEFAULT false;
ALTER TABLE retention_holds ADD COLUMN applied_through uuid;
ALTER TABLE retention_holds ADD COLUMN touched_at timestamptz NOT NULL DEFAULT now();
CREATE INDEX retention_holds_applying ON retention_holds (org_id, id) WHERE applying;
