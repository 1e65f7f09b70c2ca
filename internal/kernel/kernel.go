// Package kernel turns distribution kernel packages into what banger boots: an
// uncompressed ELF vmlinux (which both QEMU and Firecracker load directly) and
// an initrd holding banger-agent as /init plus the few kernel modules a
// virtio guest needs.
//
// The usual flow, all of it without root:
//
//	name, _ := kernel.ResolveKernelPackage(ctx, kernel.CloudKernelMetaPackage)
//	deb, _ := kernel.FetchPackage(ctx, name, downloadDir)     // apt-get download
//	k, _ := kernel.ImportDeb(ctx, deb, kernelDir)             // vmlinux + modules + depmod
//	_ = kernel.WriteInitrd(ctx, initrdPath, kernel.InitrdOptions{Kernel: k, AgentPath: agent})
//
// The package holds no global state; every function that runs a program or may
// block takes a context.
package kernel

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
)

// Kernel is an imported guest kernel on disk.
type Kernel struct {
	// Version is the kernel release, e.g. "6.1.0-56-cloud-amd64" (uname -r in the guest).
	Version string `json:"version"`
	// VmlinuxPath is the uncompressed x86-64 ELF kernel.
	VmlinuxPath string `json:"vmlinux"`
	// ModulesDir is the directory holding the modules of Version and the
	// depmod output (modules.dep, modules.builtin, ...), i.e. .../lib/modules/<Version>.
	ModulesDir string `json:"modules_dir"`
	// Package is the Debian package the kernel came from ("" when unknown).
	Package string `json:"package,omitempty"`
}

// ManifestName is the file ImportDeb writes next to the kernel, describing it.
const ManifestName = "kernel.json"

// Load reads the manifest ImportDeb wrote into dir and checks that the files it
// names still exist.
func Load(dir string) (*Kernel, error) {
	b, err := os.ReadFile(filepath.Join(dir, ManifestName))
	if err != nil {
		return nil, fmt.Errorf("read kernel manifest: %w", err)
	}
	var k Kernel
	if err := json.Unmarshal(b, &k); err != nil {
		return nil, fmt.Errorf("kernel manifest %s is corrupt: %w", filepath.Join(dir, ManifestName), err)
	}
	if k.Version == "" || k.VmlinuxPath == "" || k.ModulesDir == "" {
		return nil, fmt.Errorf("kernel manifest %s is incomplete", filepath.Join(dir, ManifestName))
	}
	// Paths are stored relative to dir so that the directory can be moved.
	if !filepath.IsAbs(k.VmlinuxPath) {
		k.VmlinuxPath = filepath.Join(dir, k.VmlinuxPath)
	}
	if !filepath.IsAbs(k.ModulesDir) {
		k.ModulesDir = filepath.Join(dir, k.ModulesDir)
	}
	for _, p := range []string{k.VmlinuxPath, filepath.Join(k.ModulesDir, "modules.dep")} {
		if _, err := os.Stat(p); err != nil {
			return nil, fmt.Errorf("kernel in %s is incomplete (re-import it): %w", dir, err)
		}
	}
	return &k, nil
}

func writeManifest(dir string, k *Kernel) error {
	rel := *k
	var err error
	if rel.VmlinuxPath, err = filepath.Rel(dir, k.VmlinuxPath); err != nil {
		return err
	}
	if rel.ModulesDir, err = filepath.Rel(dir, k.ModulesDir); err != nil {
		return err
	}
	b, err := json.MarshalIndent(&rel, "", "  ")
	if err != nil {
		return err
	}
	return writeFileAtomic(filepath.Join(dir, ManifestName), append(b, '\n'), 0o644)
}

// writeFileAtomic writes data to a temporary file next to path and renames it
// into place, so readers never see a partial file.
func writeFileAtomic(path string, data []byte, perm os.FileMode) (err error) {
	f, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".tmp-*")
	if err != nil {
		return err
	}
	defer func() {
		if err != nil {
			_ = f.Close()
			_ = os.Remove(f.Name())
		}
	}()
	if _, err = f.Write(data); err != nil {
		return err
	}
	if err = f.Chmod(perm); err != nil {
		return err
	}
	if err = f.Close(); err != nil {
		return err
	}
	return os.Rename(f.Name(), path)
}
