-- What bangerd kept in small files beside each VM (expires_at, ports.json,
-- the pool marker) now lives in the VM's record, so that a listing is one
-- query and a pool claim one conditional update. bangerd imports and removes
-- any such files left by an older version at start-up.
--   expires_at: when bangerd deletes the VM (RFC 3339, UTC; '' none)
--   forwards:   the published ports, a JSON array of api.Forward with port 0
--               ('' none); the listening port is runtime state
--   pool:       the ready pool's spec key of an unclaimed pool VM ('' none)
-- None is written by UpdateVM, so a stale record cannot undo them.
ALTER TABLE vms ADD COLUMN expires_at TEXT NOT NULL DEFAULT '';
ALTER TABLE vms ADD COLUMN forwards TEXT NOT NULL DEFAULT '';
ALTER TABLE vms ADD COLUMN pool TEXT NOT NULL DEFAULT '';
