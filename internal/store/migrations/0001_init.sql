CREATE TABLE kernels (
    id           TEXT PRIMARY KEY,
    name         TEXT NOT NULL UNIQUE,
    version      TEXT NOT NULL DEFAULT '',
    vmlinux_path TEXT NOT NULL,
    initrd_path  TEXT NOT NULL DEFAULT '',
    modules_dir  TEXT NOT NULL DEFAULT '',
    source       TEXT NOT NULL DEFAULT '',
    size_bytes   INTEGER NOT NULL DEFAULT 0,
    created_at   TEXT NOT NULL
);

CREATE TABLE images (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL UNIQUE,
    digest      TEXT NOT NULL DEFAULT '',
    rootfs_path TEXT NOT NULL,
    size_bytes  INTEGER NOT NULL DEFAULT 0,
    source      TEXT NOT NULL DEFAULT '',
    config_json TEXT NOT NULL DEFAULT '{}',
    created_at  TEXT NOT NULL
);

CREATE TABLE vms (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL UNIQUE,
    image_id    TEXT NOT NULL REFERENCES images(id) ON DELETE RESTRICT,
    kernel_id   TEXT NOT NULL REFERENCES kernels(id) ON DELETE RESTRICT,
    vcpus       INTEGER NOT NULL,
    memory_mib  INTEGER NOT NULL,
    disk_mib    INTEGER NOT NULL,
    state       TEXT NOT NULL,
    driver      TEXT NOT NULL DEFAULT '',
    ip          TEXT NOT NULL DEFAULT '',
    mac         TEXT NOT NULL DEFAULT '',
    tap         TEXT NOT NULL DEFAULT '',
    workspace   TEXT NOT NULL DEFAULT '',
    last_error  TEXT NOT NULL DEFAULT '',
    created_at  TEXT NOT NULL,
    updated_at  TEXT NOT NULL
);

CREATE UNIQUE INDEX vms_ip ON vms(ip) WHERE ip != '';
