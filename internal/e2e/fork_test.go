package e2e

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/bangerdev/banger/internal/testenv"
)

// execOut runs a command in a VM and returns its trimmed stdout.
func execOut(t *testing.T, h, vm, script string) string {
	t.Helper()
	return strings.TrimSpace(mustBanger(t, h, "exec", vm, "--", "sh", "-c", script))
}

func counterValue(t *testing.T, h, vm string) int {
	t.Helper()
	n, err := strconv.Atoi(execOut(t, h, vm, "cat /tmp/ctr/n"))
	if err != nil {
		t.Fatalf("%s: counter: %v", vm, err)
	}
	return n
}

// waitCounterAbove polls until the counter in vm passes n.
func waitCounterAbove(t *testing.T, h, vm string, n int) int {
	t.Helper()
	var got int
	testenv.WaitFor(t, 20*time.Second, vm+"'s counter passes "+strconv.Itoa(n), func() bool {
		got = counterValue(t, h, vm)
		return got > n
	})
	return got
}

type identity struct {
	hostname, machineID, random, ip, mac, hostKey string
}

func identityOf(t *testing.T, h, vm string) identity {
	t.Helper()
	out := execOut(t, h, vm, "hostname; cat /etc/machine-id 2>/dev/null || echo none; head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n'")
	f := strings.Split(out, "\n")
	if len(f) != 3 {
		t.Fatalf("%s identity: %q", vm, out)
	}
	var v struct {
		ID  string `json:"id"`
		IP  string `json:"ip"`
		MAC string `json:"mac"`
	}
	if err := json.Unmarshal([]byte(mustBanger(t, h, "vm", "show", vm, "-o", "json")), &v); err != nil {
		t.Fatal(err)
	}
	key, err := os.ReadFile(filepath.Join(h, "vms", v.ID, "host_key.pub"))
	if err != nil {
		t.Fatal(err)
	}
	return identity{hostname: f[0], machineID: f[1], random: f[2], ip: v.IP, mac: v.MAC, hostKey: string(key)}
}

// The acceptance test of issue 11 on a real guest: a counter started before
// the fork keeps counting in the clone; the clone's identity differs; both
// answer at once; their RNGs differ; the clone outlives its source.
func TestForkRealGuest(t *testing.T) {
	// The default (anonymous guest memory, snapshots in a migration
	// stream) and qemu_memory_file (memory in a tmpfs file, copied by a
	// snapshot and mapped by its clones).
	for _, tc := range []struct{ name, env, saved string }{
		{"anonymous memory", "BANGER_QEMU_MEMORY_FILE=0", `"memory":"stream"`},
		{"memory file", "BANGER_QEMU_MEMORY_FILE=1", `"memory":"file"`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if tc.saved == `"memory":"file"` {
				var st unix.Statfs_t
				if unix.Statfs("/dev/shm", &st) != nil || int64(st.Bavail)*int64(st.Bsize) < 1<<30 {
					t.Skip("/dev/shm has less than 1 GiB free here: bangerd would fall back to anonymous memory")
				}
			}
			h, d, _ := realHomeEnv(t, tc.env)
			forkRealGuest(t, h, d)
			if !strings.Contains(d.logs.String(), tc.saved) {
				t.Errorf("no snapshot saved with %s in bangerd's log", tc.saved)
			}
		})
	}
}

func forkRealGuest(t *testing.T, h string, d *daemonProc) {
	if _, errOut, code := banger(t, h, "vm", "create", "src", "--memory", "256M", "--disk", "256M"); code != 0 {
		t.Fatalf("create: exit %d: %s\n%s", code, errOut, d.logs.String())
	}
	// A counter in tmpfs, detached from the exec session. Each value is
	// written aside and renamed into place: a reader (or a snapshot taken
	// between the shell's truncate and its write) never sees it empty.
	mustBanger(t, h, "exec", "src", "--", "sh", "-c",
		"mkdir -p /tmp/ctr && mount -t tmpfs tmpfs /tmp/ctr && echo 0 > /tmp/ctr/n && "+
			"setsid sh -c 'i=0; while :; do i=$((i+1)); echo $i > /tmp/ctr/t; mv /tmp/ctr/t /tmp/ctr/n; sleep 0.2; done' </dev/null >/dev/null 2>&1 &")
	before := waitCounterAbove(t, h, "src", 2)
	srcID := identityOf(t, h, "src")

	start := time.Now()
	out, errOut, code := banger(t, h, "vm", "fork", "src", "clone")
	if code != 0 {
		t.Fatalf("fork: exit %d: %s\n%s", code, errOut, d.logs.String())
	}
	t.Logf("fork took %v: %s", time.Since(start).Round(time.Millisecond), strings.TrimSpace(out))

	// The first command in the clone already sees the clone's identity
	// files (the agent writes them after replying; commands wait for them).
	if got := execOut(t, h, "clone", "cat /etc/hostname; grep -c '127.0.1.1.clone$' /etc/hosts"); got != "clone\n1" {
		t.Errorf("the clone's first command sees /etc/hostname and its /etc/hosts entry as %q, want clone and 1", got)
	}

	// The clone resumed the source's memory: the counter is there and counts on.
	c1 := counterValue(t, h, "clone")
	if c1 < before {
		t.Errorf("the clone's counter is %d, below the %d the source had before the fork (rebooted?)", c1, before)
	}
	c2 := waitCounterAbove(t, h, "clone", c1)
	t.Logf("counter: source %d before the fork; clone %d then %d", before, c1, c2)

	cloneID := identityOf(t, h, "clone")
	srcAfter := identityOf(t, h, "src")
	if cloneID.hostname != "clone" || srcAfter.hostname != "src" {
		t.Errorf("hostnames: source %q, clone %q", srcAfter.hostname, cloneID.hostname)
	}
	if cloneID.machineID == srcAfter.machineID || cloneID.machineID == "none" {
		t.Errorf("machine-id: source %q, clone %q", srcAfter.machineID, cloneID.machineID)
	}
	if cloneID.hostKey == srcID.hostKey {
		t.Error("the clone's pinned host key is the source's")
	}
	if cloneID.random == srcAfter.random {
		t.Errorf("the clone's RNG gives the source's bytes: %s", cloneID.random)
	}
	if srcID.ip != "" {
		if cloneID.ip == srcID.ip || cloneID.mac == srcID.mac {
			t.Errorf("network identity: source %s/%s, clone %s/%s", srcID.ip, srcID.mac, cloneID.ip, cloneID.mac)
		}
		if got := execOut(t, h, "clone", "cat /sys/class/net/eth0/address"); !strings.EqualFold(got, cloneID.mac) {
			t.Errorf("the clone's interface has MAC %s, its record %s", got, cloneID.mac)
		}
	} else {
		t.Log("no guest network on this host (no banger-helper): IP and MAC not compared")
	}

	// Both answer at the same time.
	var wg sync.WaitGroup
	outs := make([]string, 2)
	for i, vm := range []string{"src", "clone"} {
		wg.Add(1)
		go func() {
			defer wg.Done()
			o, _, code := banger(t, h, "exec", vm, "--", "hostname")
			if code == 0 {
				outs[i] = strings.TrimSpace(o)
			}
		}()
	}
	wg.Wait()
	if outs[0] != "src" || outs[1] != "clone" {
		t.Errorf("concurrent exec: %q", outs)
	}

	// The clone outlives its source.
	mustBanger(t, h, "vm", "delete", "src", "--force")
	c3 := waitCounterAbove(t, h, "clone", c2)
	if got := execOut(t, h, "clone", "echo alive"); got != "alive" {
		t.Fatalf("clone after the source was deleted: %q", got)
	}
	t.Logf("clone counts on after the source is gone: %d", c3)

	// Snapshots as artifacts: create, create a VM from one, list, remove.
	mustBanger(t, h, "snapshot", "create", "clone", "base")
	var snaps []struct {
		Name       string `json:"name"`
		StateBytes int64  `json:"state_bytes"`
		DiskBytes  int64  `json:"disk_bytes"`
	}
	if err := json.Unmarshal([]byte(mustBanger(t, h, "snapshot", "ls", "-o", "json")), &snaps); err != nil || len(snaps) != 1 {
		t.Fatalf("snapshot ls: %v %v", snaps, err)
	}
	t.Logf("snapshot of a 256 MiB guest: state %d bytes, disk %d bytes", snaps[0].StateBytes, snaps[0].DiskBytes)
	if snaps[0].StateBytes >= 256<<20 {
		t.Errorf("snapshot state %d bytes: not less than the guest's memory", snaps[0].StateBytes)
	}
	mustBanger(t, h, "vm", "create", "from-snap", "--snapshot", "base")
	waitCounterAbove(t, h, "from-snap", c3)
	if got := execOut(t, h, "from-snap", "hostname"); got != "from-snap" {
		t.Errorf("hostname of a VM made from a snapshot: %q", got)
	}
	mustBanger(t, h, "vm", "pause", "from-snap")
	if _, errOut, code := banger(t, h, "exec", "from-snap", "--", "true"); code == 0 || !strings.Contains(errOut, "paused") {
		t.Errorf("exec in a paused VM: exit %d: %s", code, errOut)
	}
	mustBanger(t, h, "vm", "resume", "from-snap")
	execOut(t, h, "from-snap", "true")
	mustBanger(t, h, "snapshot", "create", "from-snap", "second", "--stop")
	if v := showVM(t, h, "from-snap"); v.State != "stopped" {
		t.Errorf("after snapshot --stop: %s", v.State)
	}
	mustBanger(t, h, "snapshot", "rm", "base")
	execOut(t, h, "clone", "true")

	// With no VM left, the snapshot alone keeps the image.
	mustBanger(t, h, "vm", "delete", "clone", "--force")
	mustBanger(t, h, "vm", "delete", "from-snap", "--force")
	if _, errOut, code := banger(t, h, "image", "rm", "busybox"); code == 0 || !strings.Contains(errOut, "snapshot second") {
		t.Errorf("image rm under a snapshot: exit %d: %s", code, errOut)
	}
	mustBanger(t, h, "snapshot", "rm", "second")
	mustBanger(t, h, "image", "rm", "busybox")
}

// banger run: the first run of a spec boots cold and saves its base
// snapshot; the second restores it, and is a VM of its own.
func TestRunBaseSnapshotRealGuest(t *testing.T) {
	h, d, _ := realHome(t)
	args := []string{"run", "--rm", "--image", "busybox", "--kernel", "debian", "--memory", "256M", "--disk", "256M", "--name"}
	out, errOut, code := banger(t, h, append(args, "first", "--", "hostname")...)
	if code != 0 || strings.TrimSpace(out) != "first" {
		t.Fatalf("first run: exit %d, %q\n%s\n%s", code, out, errOut, d.logs.String())
	}
	if !strings.Contains(errOut, "save base snapshot") {
		t.Errorf("the first run did not save a base snapshot:\n%s", errOut)
	}
	out, errOut, code = banger(t, h, append(args, "second", "--", "hostname")...)
	if code != 0 || strings.TrimSpace(out) != "second" {
		t.Fatalf("second run: exit %d, %q\n%s", code, out, errOut)
	}
	if !strings.Contains(errOut, "restore") || strings.Contains(errOut, "boot ") {
		t.Errorf("the second run did not restore the base snapshot:\n%s", errOut)
	}
	t.Logf("second run stages:\n%s", errOut)
	for _, l := range strings.Split(d.logs.String(), "\n") {
		if strings.Contains(l, "reidentified") || strings.Contains(l, "guest agent answered") {
			t.Log(l)
		}
	}
	_, errOut, code = banger(t, h, append([]string{"run", "--cold"}, append(args[1:], "third", "--", "hostname")...)...)
	if code != 0 || strings.Contains(errOut, "restore") {
		t.Errorf("--cold: exit %d\n%s", code, errOut)
	}
	// The base pins the image only as a cache: image rm drops it.
	mustBanger(t, h, "image", "rm", "busybox")
	if l := listSnapshots(t, h); len(l) != 0 {
		t.Errorf("snapshots left after image rm: %+v", l)
	}
}

// A clone on banger's network: its own MAC and address on its interface,
// reachable at that address (a listener forked with its memory answers
// with the clone's hostname), and it reaches the outside through NAT, which
// the per-tap anti-spoofing rules would refuse with the source's MAC or
// address.
func TestForkNetworkRealGuest(t *testing.T) {
	r := newNetRig(t)
	e, h := r.env, r.home
	r.waitCreate(t, r.beginCreate(t, "neta"))
	res := r.guestExecAll(t, []guestCmd{{"neta", "setsid busybox nc -ll -p 8080 -e hostname </dev/null >/dev/null 2>&1 &"}})
	if res[0].code != 0 {
		t.Fatalf("start listener: %s", res[0].out)
	}
	start := time.Now()
	out := mustBanger(t, h, "vm", "fork", "neta", "netc")
	t.Logf("fork took %v: %s", time.Since(start).Round(time.Millisecond), strings.TrimSpace(out))
	type vmNet struct{ IP, MAC string }
	show := func(n string) vmNet {
		var v vmNet
		if err := json.Unmarshal([]byte(mustBanger(t, h, "vm", "show", n, "-o", "json")), &v); err != nil {
			t.Fatal(err)
		}
		return v
	}
	a, c := show("neta"), show("netc")
	if a.IP == "" || c.IP == "" || a.IP == c.IP || strings.EqualFold(a.MAC, c.MAC) {
		t.Fatalf("network identities: source %+v, clone %+v", a, c)
	}
	res = r.guestExecAll(t, []guestCmd{{"netc", "cat /sys/class/net/eth0/address; ip -4 addr show eth0"}})
	if res[0].code != 0 || !strings.Contains(strings.ToLower(res[0].out), strings.ToLower(c.MAC)) ||
		!strings.Contains(res[0].out, " "+c.IP+"/") || strings.Contains(res[0].out, " "+a.IP+"/") {
		t.Fatalf("the clone's eth0 (want %s %s, not %s):\n%s", c.MAC, c.IP, a.IP, res[0].out)
	}
	for n, ip := range map[string]string{"neta": a.IP, "netc": c.IP} {
		var got string
		var err error
		testenv.WaitFor(t, 15*time.Second, "host to reach the listener in "+n, func() bool {
			got, err = dialIn(e, ip+":8080", 3*time.Second)
			return err == nil && got == n
		})
		t.Logf("host → %s (%s:8080): %q", n, ip, got)
	}
	internet := fmt.Sprintf("timeout 3 busybox nc %s %d </dev/null", e.InternetAddr, e.InternetPort)
	res = r.guestExecAll(t, []guestCmd{{"netc", internet}, {"neta", internet}})
	for i, n := range []string{"netc", "neta"} {
		if res[i].code != 0 || !strings.HasPrefix(strings.TrimSpace(res[i].out), "hello ") {
			t.Errorf("%s → outside: exit %d, %q", n, res[i].code, res[i].out)
		}
	}
	for _, n := range []string{"neta", "netc"} {
		mustBanger(t, h, "vm", "delete", n, "--force")
	}
}

type poolJSON struct {
	Ready int      `json:"ready"`
	Size  int      `json:"size"`
	VMs   []string `json:"vms"`
	Note  string   `json:"note"`
}

func poolReady(t *testing.T, h string) poolJSON {
	t.Helper()
	var l []poolJSON
	if err := json.Unmarshal([]byte(mustBanger(t, h, "pool", "ls", "-o", "json")), &l); err != nil || len(l) != 1 {
		t.Fatalf("pool ls: %v %v", l, err)
	}
	return l[0]
}

// The ready pool: `banger run` of the pool's spec is served from it (its
// stages say so), the VM is the run's own (hostname), and the pool refills.
func TestReadyPoolRealGuest(t *testing.T) {
	h, d, _ := realHome(t)
	spec := []string{"--image", "busybox", "--kernel", "debian", "--memory", "256M", "--disk", "256M"}
	mustBanger(t, h, append([]string{"pool", "set", "1"}, spec...)...)
	var p poolJSON
	testenv.WaitFor(t, 3*time.Minute, "the pool to fill", func() bool { p = poolReady(t, h); return p.Ready == 1 })
	first := p.VMs[0]
	var vms []vmJSON
	json.Unmarshal([]byte(mustBanger(t, h, "vm", "ls", "-o", "json")), &vms)
	if len(vms) != 0 {
		t.Errorf("vm ls shows pool VMs: %+v", vms)
	}
	json.Unmarshal([]byte(mustBanger(t, h, "vm", "ls", "--all", "-o", "json")), &vms)
	if len(vms) != 1 || vms[0].Name != first {
		t.Errorf("vm ls --all: %+v", vms)
	}
	out, errOut, code := banger(t, h, append(append([]string{"run", "--rm", "--name", "job"}, spec...), "--", "hostname")...)
	if code != 0 || strings.TrimSpace(out) != "job" {
		t.Fatalf("run: exit %d, %q\n%s\n%s", code, out, errOut, d.logs.String())
	}
	if !strings.Contains(errOut, "claim from pool") {
		t.Errorf("the run was not served from the pool:\n%s", errOut)
	}
	t.Logf("run from the pool:\n%s", errOut)
	testenv.WaitFor(t, 3*time.Minute, "the pool to refill", func() bool {
		p = poolReady(t, h)
		return p.Ready == 1 && p.VMs[0] != first
	})
	mustBanger(t, h, "pool", "set", "0", "--image", "busybox", "--kernel", "debian", "--memory", "256M", "--disk", "256M")
	json.Unmarshal([]byte(mustBanger(t, h, "vm", "ls", "--all", "-o", "json")), &vms)
	if len(vms) != 0 {
		t.Errorf("VMs left after pool set 0: %+v", vms)
	}
}
