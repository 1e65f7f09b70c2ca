package agent

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strings"

	"github.com/bangerdev/banger/internal/agent/bootcfg"
	"github.com/bangerdev/banger/internal/agent/bulk"
)

// DiskKind is what a block device holds, judged by content.
type DiskKind int

const (
	DiskUnknown DiskKind = iota
	DiskConfig           // boot configuration (bootcfg magic)
	DiskRW               // ext4 labelled bootcfg.RWLabel: the VM's writable disk
	DiskRoot             // another ext2/3/4 filesystem: the image root
	DiskSpool            // the spool (bulk.SpoolMagic): bulk data to and from the host
)

func (k DiskKind) String() string {
	switch k {
	case DiskConfig:
		return "boot config"
	case DiskRW:
		return "writable disk"
	case DiskRoot:
		return "image root"
	case DiskSpool:
		return "spool"
	}
	return "unknown"
}

const (
	extSuperblockOffset = 1024
	extMagicOffset      = 0x38
	extLabelOffset      = 0x78
	extMagic            = 0xEF53
)

// ClassifyDisk reads the start of a device and says what it holds, with the
// ext volume label when there is one.
func ClassifyDisk(r io.ReaderAt) (DiskKind, string, error) {
	buf := make([]byte, 4096)
	n, err := r.ReadAt(buf, 0)
	if err != nil && !errors.Is(err, io.EOF) {
		return DiskUnknown, "", err
	}
	buf = buf[:n]
	if bytes.HasPrefix(buf, []byte(bootcfg.Magic+" ")) {
		return DiskConfig, "", nil
	}
	if bytes.HasPrefix(buf, []byte(bulk.SpoolMagic)) {
		return DiskSpool, "", nil
	}
	if len(buf) < extSuperblockOffset+extLabelOffset+16 {
		return DiskUnknown, "", nil
	}
	sb := buf[extSuperblockOffset:]
	if binary.LittleEndian.Uint16(sb[extMagicOffset:]) != extMagic {
		return DiskUnknown, "", nil
	}
	label := string(bytes.TrimRight(sb[extLabelOffset:extLabelOffset+16], "\x00"))
	if label == bootcfg.RWLabel {
		return DiskRW, label, nil
	}
	return DiskRoot, label, nil
}

// Disk is a classified block device.
type Disk struct {
	Name  string // e.g. vda
	Path  string // e.g. /dev/vda
	Kind  DiskKind
	Label string
	// Discard: the device takes discards (its queue's discard_max_bytes is
	// not 0: QEMU's discard=unmap drives; Firecracker's API has no discard).
	Discard bool
}

// Disks is the outcome of a scan.
type Disks struct {
	Config, RW, Root, Spool *Disk
	All                     []Disk
}

// complete reports whether every disk banger needs was found.
func (d Disks) complete() bool { return d.Config != nil && d.RW != nil && d.Root != nil }

func (d Disks) String() string {
	var parts []string
	for _, x := range d.All {
		s := x.Name + "=" + x.Kind.String()
		if x.Label != "" {
			s += "(" + x.Label + ")"
		}
		parts = append(parts, s)
	}
	if len(parts) == 0 {
		return "no block devices"
	}
	return strings.Join(parts, " ")
}

// ignoredBlock are block device name prefixes that are never banger disks.
var ignoredBlock = []string{"loop", "ram", "zram", "sr", "fd", "dm-", "md", "nbd"}

// ScanDisks classifies the whole-disk block devices listed in sysBlock
// (normally /sys/block), opening them under devDir (normally /dev). The
// first image root in name order wins; extra ones are listed in All.
func ScanDisks(sysBlock, devDir string) (Disks, error) {
	ents, err := os.ReadDir(sysBlock)
	if err != nil {
		return Disks{}, err
	}
	names := make([]string, 0, len(ents))
outer:
	for _, e := range ents {
		for _, p := range ignoredBlock {
			if strings.HasPrefix(e.Name(), p) {
				continue outer
			}
		}
		names = append(names, e.Name())
	}
	sort.Strings(names)
	var d Disks
	for _, name := range names {
		p := filepath.Join(devDir, name)
		f, err := os.Open(p)
		if err != nil {
			continue // node not created yet
		}
		kind, label, err := ClassifyDisk(f)
		f.Close()
		if err != nil {
			continue
		}
		d.All = append(d.All, Disk{Name: name, Path: p, Kind: kind, Label: label, Discard: takesDiscard(sysBlock, name)})
	}
	for i := range d.All {
		x := &d.All[i]
		switch {
		case x.Kind == DiskConfig && d.Config == nil:
			d.Config = x
		case x.Kind == DiskRW && d.RW == nil:
			d.RW = x
		case x.Kind == DiskRoot && d.Root == nil:
			d.Root = x
		case x.Kind == DiskSpool && d.Spool == nil:
			d.Spool = x
		}
	}
	return d, nil
}

// readBootConfig decodes the boot configuration device.
func readBootConfig(path string) (*bootcfg.Config, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	cfg, err := bootcfg.Decode(f)
	if err != nil {
		return nil, fmt.Errorf("boot config on %s: %w", path, err)
	}
	return cfg, nil
}

// takesDiscard says whether the block device name (under sysBlock) accepts
// discards.
func takesDiscard(sysBlock, name string) bool {
	b, err := os.ReadFile(filepath.Join(sysBlock, name, "queue", "discard_max_bytes"))
	if err != nil {
		return false
	}
	v := strings.TrimSpace(string(b))
	return v != "" && v != "0"
}
