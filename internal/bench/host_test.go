package bench

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/bangerdev/banger/internal/agent/bootcfg"
	"github.com/bangerdev/banger/internal/disk"
	"github.com/bangerdev/banger/internal/store"
	"github.com/bangerdev/banger/internal/testenv"
)

// benchDisks: the writable disk at 4 GiB and 64 GiB (warm template), as
// bangerd makes it (a spare renamed into place, refilled in the background)
// and by the copy alone (a create that finds no spare), and what the same
// 64 GiB disk costs with a fresh mkfs.ext4.
func (b *bench) benchDisks() {
	ctx := context.Background()
	dir := filepath.Join(b.tmp, "disks")
	tdir := filepath.Join(dir, "templates")
	// Two Makers on one template directory: copy keeps no spares.
	copyM := &disk.Maker{Dir: tdir, Label: bootcfg.RWLabel}
	spareM := &disk.Maker{Dir: tdir, Label: bootcfg.RWLabel, Spares: 2}
	defer spareM.Close()
	// settle waits, untimed and bounded, for the refill a create started:
	// real creates are seconds apart, the bench's back to back.
	settle := func() error {
		c, cancel := context.WithTimeout(ctx, 5*time.Second)
		defer cancel()
		return spareM.Settle(c)
	}
	sizes := []int64{4 << 30, 64 << 30}
	copies, spares := map[int64][]float64{}, map[int64][]float64{}
	var refill []float64
	for _, s := range sizes { // warm: the template is made once per size, the first spare written
		for _, m := range []*disk.Maker{copyM, spareM} {
			if err := m.Make(ctx, filepath.Join(dir, "warm"), s); err != nil {
				b.fail("disk", "disk creation", err)
				return
			}
			os.Remove(filepath.Join(dir, "warm"))
		}
		if err := settle(); err != nil {
			b.fail("disk", "disk spare refill", err)
			return
		}
	}
	// The spare samples alternate sizes in a loop of their own, so each
	// follows the other size's spare and its refill (no copy's dirty pages
	// being written back meanwhile, no unlink of a disk of its own size
	// just before); the copies then alternate the same way.
	n := b.runs() * 4
	for _, m := range []*disk.Maker{spareM, copyM} {
		for i := 0; i < n; i++ {
			for _, s := range sizes {
				p := filepath.Join(dir, fmt.Sprintf("d%d", s>>30))
				os.Remove(p)
				start := time.Now()
				if err := m.Make(ctx, p, s); err != nil {
					b.fail("disk", "disk creation", err)
					return
				}
				d := ms(time.Since(start))
				if m == copyM {
					copies[s] = append(copies[s], d)
					continue
				}
				spares[s] = append(spares[s], d)
				// Removed before the refill, whose fsync then commits the
				// unlink too: the next sample does not pay for this one
				// (real creates are seconds apart, the journal commits).
				// The refill runs from Make's return, meanwhile.
				done := time.Now()
				os.Remove(p)
				if err := settle(); err != nil {
					b.fail("disk", "disk spare refill", err)
					return
				}
				if s == 64<<30 {
					refill = append(refill, ms(time.Since(done)))
				}
			}
		}
	}
	big, small := testenv.Median(spares[64<<30]), testenv.Median(spares[4<<30])
	b.add(Result{Group: "disk", Metric: "writable disk 64 GiB (vs 4 GiB)", Unit: "ms", Banger: big, Baseline: small,
		Base: "the same at 4 GiB", Target: "≤1.2×, both <10 ms", Pass: passIf(big <= 1.2*small && big < 10 && small < 10),
		N: n, Samples: spares[64<<30], BaseSmp: spares[4<<30],
		Note: "a spare renamed into place; the bench waits (untimed, ≤5 s) for its background refill between samples, as creates seconds apart would"})
	cbig, csmall := testenv.Median(copies[64<<30]), testenv.Median(copies[4<<30])
	b.add(Result{Group: "disk", Metric: "writable disk 64 GiB (vs 4 GiB), copy alone", Unit: "ms", Banger: cbig, Baseline: csmall,
		Base: "the same at 4 GiB", N: n, Samples: copies[64<<30], BaseSmp: copies[4<<30],
		Note: "no spare: the template's data regions written into a new sparse file (a create that finds no spare)"})
	b.add(Result{Group: "disk", Metric: "writable disk 64 GiB spare refill (background)", Unit: "ms", Banger: testenv.Median(refill),
		N: len(refill), Samples: refill, Note: "after a create, off its path: the copy into a temporary file, fsync, rename (from the create's return; the bench unlinks its sample meanwhile)"})
	// The old way: mkfs.ext4 on a sparse file for every disk.
	var mk []float64
	for i := 0; i < b.runs(); i++ {
		p := filepath.Join(dir, "mkfs")
		os.Remove(p)
		start := time.Now()
		f, err := os.Create(p)
		if err == nil {
			err = f.Truncate(64 << 30)
			f.Close()
		}
		if err == nil {
			var out []byte
			out, err = exec.Command("mkfs.ext4", "-q", "-F", "-L", bootcfg.RWLabel, "-m", "0",
				"-E", "lazy_itable_init=1,lazy_journal_init=1,nodiscard", p).CombinedOutput()
			if err != nil {
				err = fmt.Errorf("%v: %s", err, out)
			}
		}
		if err != nil {
			b.fail("disk", "mkfs.ext4 64 GiB", err)
			return
		}
		mk = append(mk, ms(time.Since(start)))
	}
	b.add(Result{Group: "disk", Metric: "writable disk 64 GiB (vs mkfs.ext4)", Unit: "ms", Banger: big, Baseline: testenv.Median(mk),
		Base: "mkfs.ext4 -E lazy_itable_init,lazy_journal_init on a sparse file", N: len(mk), Samples: spares[64<<30], BaseSmp: mk})
	os.RemoveAll(dir)
}

// benchRPC: system.ping, vm.list with 1000 records, bangerd's idle RSS.
func (b *bench) benchRPC() {
	ctx := context.Background()
	if b.pid > 0 {
		if rss, err := rssMiB(b.pid); err == nil {
			b.add(Result{Group: "rpc", Metric: "bangerd RSS idle after imports", Unit: "MiB", Banger: rss, Target: "<30", Pass: passIf(rss < 30), N: 1,
				Note: "kernel (.deb) and image imported, no VM"})
		}
	}
	n := b.runs() * 10
	pings, err := timeN(n, func() error { return b.cl.Ping(ctx) })
	if err != nil {
		b.fail("rpc", "system.ping", err)
	} else {
		b.add(Result{Group: "rpc", Metric: "system.ping (new connection each)", Unit: "ms", Banger: testenv.Median(pings), N: n, Samples: pings})
	}

	// 1000 stopped VM records, written straight into the database.
	st, err := store.Open(ctx, filepath.Join(b.home, "banger.db"))
	if err != nil {
		b.fail("rpc", "vm.list 1000 records", err)
		return
	}
	defer st.Close()
	imgs, err := b.cl.ListImages(ctx)
	if err != nil || len(imgs) == 0 {
		b.fail("rpc", "vm.list 1000 records", fmt.Errorf("no image: %v", err))
		return
	}
	ks, err := b.cl.ListKernels(ctx)
	if err != nil || len(ks) == 0 {
		b.fail("rpc", "vm.list 1000 records", fmt.Errorf("no kernel: %v", err))
		return
	}
	var ids []string
	defer func() {
		for _, id := range ids {
			st.DeleteVM(ctx, id)
		}
	}()
	for i := 0; i < 1000; i++ {
		var r [8]byte
		rand.Read(r[:])
		v := &store.VM{ID: hex.EncodeToString(r[:]), Name: fmt.Sprintf("list-%04d", i), ImageID: imgs[0].ID, KernelID: ks[0].ID,
			VCPUs: 1, MemoryMiB: 256, DiskMiB: 256, State: store.StateStopped, Driver: "qemu"}
		if err := st.CreateVM(ctx, v); err != nil {
			b.fail("rpc", "vm.list 1000 records", err)
			return
		}
		ids = append(ids, v.ID)
	}
	var got int
	cpu0 := cpuMs(b.pid)
	lists, err := timeN(b.runs(), func() error {
		vms, err := b.cl.ListVMs(ctx)
		got = len(vms)
		return err
	})
	if err != nil {
		b.fail("rpc", "vm.list 1000 records", err)
		return
	}
	cpuPer := (cpuMs(b.pid) - cpu0) / float64(len(lists))
	direct, _ := timeN(b.runs(), func() error { _, err := st.QueryVMsJSON(ctx, false); return err })
	p50 := testenv.Median(lists)
	b.add(Result{Group: "rpc", Metric: "vm.list, 1000 records", Unit: "ms", Banger: p50, Baseline: testenv.Median(direct),
		Base: "its SQLite query alone, in-process, uncached (store.QueryVMsJSON)", Target: "<10", Pass: passIf(p50 < 10), N: len(lists), Samples: lists, BaseSmp: direct,
		Note: fmt.Sprintf("%d VMs listed; bangerd CPU %.1f ms per call", got, cpuPer)})
}

// cpuMs is the CPU time (user+system) pid has used, in ms.
func cpuMs(pid int) float64 {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0
	}
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return 0
	}
	f := strings.Fields(s[i+1:])
	if len(f) < 13 {
		return 0
	}
	ut, _ := strconv.ParseFloat(f[11], 64)
	st, _ := strconv.ParseFloat(f[12], 64)
	return (ut + st) * 10 // USER_HZ is 100
}
