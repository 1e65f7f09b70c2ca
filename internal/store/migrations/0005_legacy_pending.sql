-- The VMs whose directories may still hold the files a bangerd before
-- schema 4 kept beside a VM (expires_at, ports.json, pool): every VM of a
-- database that reaches this version, and none made after it (a bangerd that
-- writes those files refuses a database past version 3). bangerd imports
-- their files at start-up and removes each row once done, so a start after
-- that opens no VM directory for them.
CREATE TABLE legacy_files_pending (
    vm_id TEXT PRIMARY KEY REFERENCES vms(id) ON DELETE CASCADE
);
INSERT INTO legacy_files_pending (vm_id) SELECT id FROM vms;
