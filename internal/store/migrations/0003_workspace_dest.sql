-- Where `workspace push` put the VM's workspace in the guest (--dest), so
-- that pull and status find it themselves. Written only by
-- SetWorkspaceDest (never by UpdateVM, so a stale record cannot undo it).
ALTER TABLE vms ADD COLUMN workspace_dest TEXT NOT NULL DEFAULT '';
