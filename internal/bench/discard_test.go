package bench

import (
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/bangerdev/banger/client"
	"github.com/bangerdev/banger/internal/testenv"
)

// TestDiscardAB measures what mounting the writable disk with `discard`
// costs, side by side in one guest: its ext4 is mounted a second time (the
// same superblock) and remounted with and without discard in turn, in
// alternating order, and each round times a 100 MiB write with fsync, its
// delete, 500 small files made and deleted, and an fstrim after the delete
// without discard; it reports how much of the host's sparse file each delete
// gave back. Timings include one exec round trip each.
//
//	BANGER_BENCH_DISCARD=1 go test -count=1 -run TestDiscardAB -v ./internal/bench
func TestDiscardAB(t *testing.T) {
	if os.Getenv("BANGER_BENCH_DISCARD") == "" {
		t.Skip("a benchmark: run with BANGER_BENCH_DISCARD=1 (docs/BENCHMARKS.md)")
	}
	testenv.RequireQEMU(t)
	b := &bench{t: t, tmp: shortTemp(t)}
	b.banger = testenv.Command(t, "banger")
	deb := testenv.KernelPackage(t)
	rootfs := testenv.BusyboxRootfs(t, 64)
	b.home = testenv.StartBangerd(t, "BANGER_VMM=qemu").Home
	var err error
	if b.cl, err = client.New(client.WithHome(b.home)); err != nil {
		t.Fatal(err)
	}
	if _, err := b.cli(5*time.Minute, nil, "kernel", "import", "--deb", deb, "--name", "debian"); err != nil {
		t.Fatal(err)
	}
	if _, err := b.cli(5*time.Minute, nil, "image", "import", rootfs, "--name", "busybox"); err != nil {
		t.Fatal(err)
	}
	load0 := loadavg()
	v, _, _, err := b.createVM("d", 4096)
	if err != nil {
		t.Fatal(err)
	}
	defer b.deleteVM("d")
	ex := func(script string) (string, float64) {
		t0 := time.Now()
		out, err := b.cli(5*time.Minute, nil, "exec", "d", "--", "sh", "-c", script)
		if err != nil {
			t.Fatal(err)
		}
		return out, ms(time.Since(t0))
	}
	// the writable disk's filesystem, which the root overlay's upper layer
	// is on (its own mount is not visible after the switch of root)
	const mnt = "/mnt/rw"
	out, _ := ex("mkdir -p " + mnt + "; for d in /dev/vd*; do mount -t ext4 $d " + mnt + " 2>/dev/null || continue; " +
		"if [ -d " + mnt + "/upper ]; then grep ' " + mnt + " ' /proc/mounts; exit 0; fi; umount " + mnt + "; done; echo none")
	if strings.TrimSpace(out) == "none" {
		t.Fatal("the writable disk's filesystem was not found")
	}
	t.Logf("writable disk: %s", strings.TrimSpace(out))
	rw := filepath.Join(b.home, "vms", v.ID, "rw.ext4")
	used := func() float64 {
		var st syscall.Stat_t
		if err := syscall.Stat(rw, &st); err != nil {
			t.Fatal(err)
		}
		return float64(st.Blocks*512) / (1 << 20)
	}
	res := map[string][]float64{}
	add := func(k string, v float64) { res[k] = append(res[k], v) }
	for round := 0; round < 10; round++ {
		modes := []string{"nodiscard", "discard"}
		if round%2 == 1 {
			modes = []string{"discard", "nodiscard"}
		}
		for _, mode := range modes {
			ex("mount -o remount," + mode + " " + mnt)
			_, w := ex("dd if=/dev/zero of=/root/f bs=1M count=100 conv=fsync 2>/dev/null")
			before := used()
			_, d := ex("rm /root/f && sync")
			add(mode+": write 100 MiB (fsync) ms", w)
			add(mode+": delete 100 MiB (rm; sync) ms", d)
			add(mode+": host MiB given back by the delete", before-used())
			if mode == "nodiscard" {
				_, f := ex("fstrim " + mnt)
				add("nodiscard: fstrim after the delete ms", f)
			}
			_, c := ex("mkdir -p /root/s && i=0; while [ $i -lt 500 ]; do echo x > /root/s/$i; i=$((i+1)); done; sync")
			_, r := ex("rm -rf /root/s && sync")
			add(mode+": make 500 small files (sync) ms", c)
			add(mode+": delete 500 small files (sync) ms", r)
		}
	}
	keys := make([]string, 0, len(res))
	for k := range res {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	var sb strings.Builder
	for _, k := range keys {
		s := append([]float64(nil), res[k]...)
		sort.Float64s(s)
		fmt.Fprintf(&sb, "%-45s median %7.1f  range %.1f–%.1f  n=%d\n", k, s[len(s)/2], s[0], s[len(s)-1], len(s))
	}
	t.Logf("load %s → %s\n%s", load0, loadavg(), sb.String())
}
