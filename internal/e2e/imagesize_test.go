package e2e

import (
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"testing"
	"time"

	"github.com/bangerdev/banger/internal/testenv"
)

var stageLine = regexp.MustCompile(`(?m)^✓ (.+?)\s+(\d+) ms$`)

// createTimed creates a VM and returns the wall time and the stage timings.
func createTimed(t *testing.T, h, name string, args ...string) (time.Duration, map[string]int) {
	t.Helper()
	t0 := time.Now()
	_, errOut, code := banger(t, h, append([]string{"vm", "create", name, "--memory", "256M", "--disk", "256M"}, args...)...)
	d := time.Since(t0)
	if code != 0 {
		t.Fatalf("create %s: %s", name, errOut)
	}
	stages := map[string]int{}
	for _, m := range stageLine.FindAllStringSubmatch(errOut, -1) {
		stages[m[1]], _ = strconv.Atoi(m[2])
	}
	return d, stages
}

// TestCreateCostIndependentOfImageSize: the per-VM root disk is copy-on-write
// from the shared image, so a VM from a 2 GiB image is made as fast as one
// from a 100 MiB image, and the image is not copied per VM.
func TestCreateCostIndependentOfImageSize(t *testing.T) {
	h, _, _ := realHome(t)
	// inside the home, where bangerd (nobody, see daemonUID) can read them
	small := filepath.Join(h, "small.ext4")
	if out, err := exec.Command("cp", "--sparse=always", testenv.BusyboxRootfs(t, 100), small).CombinedOutput(); err != nil {
		t.Fatalf("cp: %v %s", err, out)
	}
	big := filepath.Join(h, "big.ext4")
	if out, err := exec.Command("cp", "--sparse=always", small, big).CombinedOutput(); err != nil {
		t.Fatalf("cp: %v %s", err, out)
	}
	if err := os.Truncate(big, 2<<30); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("resize2fs", big).CombinedOutput(); err != nil {
		t.Fatalf("resize2fs: %v %s", err, out)
	}
	if uid := int(daemonUID()); uid != 0 {
		os.Chown(small, uid, uid)
		os.Chown(big, uid, uid)
	}
	mustBanger(t, h, "image", "import", small, "--name", "small")
	mustBanger(t, h, "image", "import", big, "--name", "big")

	// Warm-up: the first start builds the kernel's initrd and probes the VMM.
	createTimed(t, h, "warmup", "--image", "small")
	mustBanger(t, h, "vm", "delete", "warmup", "--force")

	var smallT, bigT []time.Duration
	var smallHost, bigHost []int
	for i := 0; i < 2; i++ {
		for _, img := range []string{"small", "big"} {
			name := img + strconv.Itoa(i)
			d, st := createTimed(t, h, name, "--image", img)
			host := st["check"] + st["prepare host"] + st["configure"] + st["boot"]
			t.Logf("%s: total %v, banger+VMM start %d ms, stages %v", name, d.Round(time.Millisecond), host, st)
			if img == "small" {
				smallT, smallHost = append(smallT, d), append(smallHost, host)
			} else {
				bigT, bigHost = append(bigT, d), append(bigHost, host)
			}
			// the VM's own disk does not hold a copy of the image
			vm := showVM(t, h, name)
			var used int64
			filepath.Walk(filepath.Join(h, "vms", vm.ID), func(p string, info os.FileInfo, err error) error {
				if err == nil && info.Mode().IsRegular() {
					used += diskUsage(p)
				}
				return nil
			})
			if used > 64<<20 {
				t.Errorf("VM %s directory uses %d MiB on disk: the image was copied", name, used>>20)
			}
			mustBanger(t, h, "vm", "delete", name, "--force")
		}
	}
	ms, mb := medianDur(smallT), medianDur(bigT)
	hs, hb := medianInt(smallHost), medianInt(bigHost)
	t.Logf("median create→ready: 100 MiB image %v, 2 GiB image %v (ratio %.2f); host-side stages %d ms vs %d ms", ms, mb, float64(mb)/float64(ms), hs, hb)
	// generous bound: emulated boots vary by a second or more on a busy 2-core machine
	if mb > ms*3/2+2*time.Second {
		t.Fatalf("creating from a 2 GiB image (%v) is much slower than from a 100 MiB one (%v)", mb, ms)
	}
	if hb > hs*2+500 {
		t.Fatalf("host-side create stages from a 2 GiB image (%d ms) vs 100 MiB (%d ms): not O(1) in image size", hb, hs)
	}
}

func medianDur(d []time.Duration) time.Duration {
	s := append([]time.Duration(nil), d...)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	return s[len(s)/2]
}

func medianInt(d []int) int {
	s := append([]int(nil), d...)
	sort.Ints(s)
	return s[len(s)/2]
}
