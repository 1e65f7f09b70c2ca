CREATE TABLE snapshots (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL UNIQUE,
    source_vm   TEXT NOT NULL DEFAULT '',
    image_id    TEXT NOT NULL REFERENCES images(id) ON DELETE RESTRICT,
    kernel_id   TEXT NOT NULL REFERENCES kernels(id) ON DELETE RESTRICT,
    driver      TEXT NOT NULL,
    vcpus       INTEGER NOT NULL,
    memory_mib  INTEGER NOT NULL,
    disk_mib    INTEGER NOT NULL,
    state_bytes INTEGER NOT NULL DEFAULT 0,
    disk_bytes  INTEGER NOT NULL DEFAULT 0,
    created_at  TEXT NOT NULL
);
