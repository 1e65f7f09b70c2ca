package api

import "time"

// Image is a registered root filesystem image.
type Image struct {
	ID         string    `json:"id"`
	Name       string    `json:"name"`
	Digest     string    `json:"digest,omitempty"`
	RootfsPath string    `json:"rootfs_path"`
	SizeBytes  int64     `json:"size_bytes"`
	Source     string    `json:"source,omitempty"`
	CreatedAt  time.Time `json:"created_at"`
}

// Kernel is a registered guest kernel.
type Kernel struct {
	ID          string    `json:"id"`
	Name        string    `json:"name"`
	Version     string    `json:"version,omitempty"`
	VmlinuxPath string    `json:"vmlinux_path"`
	InitrdPath  string    `json:"initrd_path,omitempty"`
	ModulesDir  string    `json:"modules_dir,omitempty"`
	Source      string    `json:"source,omitempty"`
	SizeBytes   int64     `json:"size_bytes"`
	CreatedAt   time.Time `json:"created_at"`
}

// NameRef names an image or kernel by name, id or unambiguous id prefix.
type NameRef struct {
	Name string `json:"name"`
}

// KernelImportParams is kernel.import: exactly one of Path, Deb, Package.
// Paths are on the host and must be absolute.
type KernelImportParams struct {
	Name    string `json:"name,omitempty"`
	Path    string `json:"path,omitempty"`   // vmlinux or bzImage on the host
	Initrd  string `json:"initrd,omitempty"` // optional initrd to put before banger's
	Deb     string `json:"deb,omitempty"`    // a Debian linux-image .deb
	Package string `json:"package,omitempty"`
}

// ImageImportParams is image.import of an ext4 root filesystem, a docker
// save tarball or an OCI layout (tarball or directory).
type ImageImportParams struct {
	Name        string `json:"name,omitempty"`
	Path        string `json:"path"`
	HeadroomMiB int    `json:"headroom_mib,omitempty"`
}

// ImageOpParams starts a long image operation: image.pull.begin (Ref),
// image.import.begin (Path) or image.build.begin (Suite).
type ImageOpParams struct {
	Name string `json:"name,omitempty"`
	// Pull
	Ref      string `json:"ref,omitempty"`
	Insecure bool   `json:"insecure,omitempty"` // plain HTTP registry
	// Import
	Path string `json:"path,omitempty"`
	// Build (debootstrap)
	Suite    string   `json:"suite,omitempty"`
	Mirror   string   `json:"mirror,omitempty"`
	Packages []string `json:"packages,omitempty"`
	// HeadroomMiB is free space in the image beyond its content (default 64).
	HeadroomMiB int `json:"headroom_mib,omitempty"`
}

// ImageOpStatusParams is image.op.status.
type ImageOpStatusParams struct {
	OpID string `json:"op_id"`
}

// ImageOpStatus is image.op.status's result (and the begin calls').
type ImageOpStatus struct {
	OpID    string `json:"op_id"`
	Kind    string `json:"kind"`
	Phase   string `json:"phase"`
	Current int64  `json:"current"`
	Total   int64  `json:"total"`
	Done    bool   `json:"done"`
	Error   string `json:"error,omitempty"`
	Image   *Image `json:"image,omitempty"`
	Reused  bool   `json:"reused,omitempty"` // an image with the same digest was reused
}

// ImageConfig is the part of an image's recorded config banger honours:
// Env, WorkingDir and User for every command, Entrypoint and Cmd for `banger run`.
type ImageConfig struct {
	Env        []string `json:"env,omitempty"`
	WorkingDir string   `json:"working_dir,omitempty"`
	User       string   `json:"user,omitempty"`
	Entrypoint []string `json:"entrypoint,omitempty"`
	Cmd        []string `json:"cmd,omitempty"`
}
