package e2e

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/creack/pty"

	"github.com/bangerdev/banger/internal/testenv"
)

// TestAgentLifecycleRealGuest: vm ls -q, --format, --filter and completion
// see real VMs; a VM created with --ttl 5s is gone within 10 s of its
// create; vm prune deletes the stopped one.
func TestAgentLifecycleRealGuest(t *testing.T) {
	h, d, _ := realHome(t)
	if _, errOut, code := banger(t, h, "vm", "create", "keep", "--memory", "256M", "--disk", "512M"); code != 0 {
		t.Fatalf("create: %d %s\n%s", code, errOut, d.logs.String())
	}
	t.Cleanup(func() { banger(t, h, "vm", "rm", "-f", "keep") })
	if out := mustBanger(t, h, "vm", "ls", "--format", "{{.Name}} {{.State}}"); out != "keep running\n" {
		t.Errorf("vm ls --format: %q", out)
	}
	if out := mustBanger(t, h, "vm", "ls", "-q"); len(strings.TrimSpace(out)) < 12 || strings.Contains(out, "keep") {
		t.Errorf("vm ls -q: %q", out)
	}
	if out := mustBanger(t, h, "__complete", "vm", "show", ""); !strings.Contains(out, "keep") {
		t.Errorf("__complete vm show: %q", out)
	}
	// The writable disk is a sparse copy whose holes read as zeros, so the
	// guest kernel must not zero its inode tables in the background
	// (noinit_itable): that would cost emulated CPU after every boot and
	// fill the host's sparse file.
	// The writable disk is a sparse copy whose holes read as zeros, so the
	// guest kernel must not zero its inode tables in the background
	// (noinit_itable): that would cost emulated CPU after every boot and
	// fill the host's sparse file.
	// One line per filesystem, its options (one per line in the file) joined by commas.
	opts := mustBanger(t, h, "exec", "keep", "--", "sh", "-c", "for f in /proc/fs/ext4/*/options; do tr '\\n' , < $f; echo; done")
	rwMounts := 0
	for _, l := range strings.Split(strings.TrimSpace(opts), "\n") {
		if strings.HasPrefix(l, "rw,") {
			rwMounts++
			if !strings.Contains(","+l+",", ",noinit_itable,") {
				t.Errorf("the writable disk is mounted with the kernel zeroing its inode tables: %s", l)
			}
		}
	}
	if rwMounts != 1 {
		t.Errorf("%d read-write ext4 mounts in the guest, want the writable disk's only:\n%s", rwMounts, opts)
	}

	t0 := time.Now()
	if _, errOut, code := banger(t, h, "vm", "create", "brief", "--ttl", "5s", "--memory", "256M", "--disk", "512M"); code != 0 {
		t.Fatalf("create --ttl: %d %s\n%s", code, errOut, d.logs.String())
	}
	t.Cleanup(func() { banger(t, h, "vm", "rm", "-f", "brief") })
	created := time.Since(t0)
	if ls, _, _ := banger(t, h, "vm", "ls", "-o", "json"); !strings.Contains(ls, `"expires_at"`) && created < 5*time.Second {
		t.Errorf("vm ls -o json lacks expires_at: %s", ls)
	}
	// Gone within 10 s of the create; on a machine so loaded that the boot
	// alone takes longer, within 3 s of the create returning (the expiry
	// has passed by then; the reaper runs every second).
	deadline := 10*time.Second - time.Since(t0)
	if created > 7*time.Second {
		t.Logf("the create alone took %v: allowing 3 s after it", created)
		deadline = 3 * time.Second
	}
	testenv.WaitFor(t, deadline, "the VM with --ttl 5s to be deleted", func() bool {
		return strings.TrimSpace(mustBanger(t, h, "vm", "ls", "-q", "--filter", "name=brief")) == ""
	})
	t.Logf("MEASURE --ttl 5s: created in %v, gone %v after the create began", created.Round(time.Millisecond), time.Since(t0).Round(time.Millisecond))
	if !strings.Contains(d.logs.String(), "ttl expired") {
		t.Errorf("bangerd did not log the expiry")
	}

	mustBanger(t, h, "vm", "stop", "keep")
	if out := mustBanger(t, h, "vm", "prune"); out != "deleted keep\n" {
		t.Errorf("vm prune: %q", out)
	}
	if out := mustBanger(t, h, "vm", "ls", "-q"); out != "" {
		t.Errorf("VMs left: %q", out)
	}
}

// TestPortsRealGuest: -p on create publishes a guest port through bangerd
// (JSON gives the chosen port for 0); port-forward takes several specs and
// --auto follows the guest's listeners.
func TestPortsRealGuest(t *testing.T) {
	h, d, _ := realHome(t)
	out, errOut, code := banger(t, h, "vm", "create", "web", "-p", "0:9000", "--memory", "256M", "--disk", "512M", "-o", "json")
	if code != 0 {
		t.Fatalf("create -p: %d %s\n%s", code, errOut, d.logs.String())
	}
	t.Cleanup(func() { banger(t, h, "vm", "rm", "-f", "web") })
	var v struct {
		Forwards []struct {
			Host      string `json:"host"`
			Port      int    `json:"port"`
			GuestPort int    `json:"guest_port"`
		} `json:"forwards"`
	}
	if err := json.Unmarshal([]byte(out), &v); err != nil || len(v.Forwards) != 1 || v.Forwards[0].Port == 0 || v.Forwards[0].GuestPort != 9000 {
		t.Fatalf("create -p 0:9000 -o json: %v %s", err, out)
	}
	if ls := mustBanger(t, h, "vm", "ls", "-o", "json"); !strings.Contains(ls, `"guest_port": 9000`) {
		t.Errorf("vm ls -o json lacks the published port: %s", ls)
	}
	mustBanger(t, h, "exec", "web", "--", "sh", "-c", "mkdir -p /www && echo published > /www/index.html && httpd -p 9000 -h /www && httpd -p 9001 -h /www")
	get := func(port int) string {
		t.Helper()
		var body string
		testenv.WaitFor(t, 20*time.Second, fmt.Sprintf("GET 127.0.0.1:%d", port), func() bool {
			c := http.Client{Timeout: 3 * time.Second}
			resp, err := c.Get(fmt.Sprintf("http://127.0.0.1:%d/index.html", port))
			if err != nil {
				return false
			}
			defer resp.Body.Close()
			b, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<10))
			body = string(b)
			return resp.StatusCode == 200
		})
		return body
	}
	if got := get(v.Forwards[0].Port); got != "published\n" {
		t.Fatalf("published port served %q", got)
	}

	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, filepath.Join(bins(t), "banger"), "port-forward", "web", "0:9000", "--auto", "-o", "json")
	cmd.Env = append(os.Environ(), "BANGER_HOME="+h)
	stdout, _ := cmd.StdoutPipe()
	var stderr lockedBuf
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { cmd.Process.Signal(os.Interrupt); cmd.Wait() }()
	lines := make(chan string, 16)
	go func() {
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			lines <- sc.Text()
		}
		close(lines)
	}()
	next := func(what string) map[string]any {
		t.Helper()
		select {
		case l, ok := <-lines:
			var m map[string]any
			if !ok || json.Unmarshal([]byte(l), &m) != nil {
				t.Fatalf("%s: line %q (stderr %s)", what, l, stderr.String())
			}
			return m
		case <-time.After(30 * time.Second):
			t.Fatalf("%s: nothing within 30s (stderr %s)", what, stderr.String())
		}
		return nil
	}
	first := next("the explicit forwards")
	fws, _ := first["forwards"].([]any)
	if len(fws) != 1 {
		t.Fatalf("port-forward -o json: %v", first)
	}
	p0 := int(fws[0].(map[string]any)["port"].(float64))
	if got := get(p0); got != "published\n" {
		t.Fatalf("explicit forward served %q", got)
	}
	ev := next("the --auto forward of 9001")
	fw, _ := ev["forward"].(map[string]any)
	if ev["event"] != "forwarding" || fw == nil || fw["guest_port"] != float64(9001) {
		t.Fatalf("auto event: %v", ev)
	}
	if got := get(int(fw["port"].(float64))); got != "published\n" {
		t.Fatalf("auto forward served %q", got)
	}

	// exec -it: a terminal both ways, raw, as docker exec -it gives
	ptmx, tty, err := pty.Open()
	if err != nil {
		t.Skipf("no pseudo-terminal: %v", err)
	}
	defer ptmx.Close()
	it := exec.CommandContext(ctx, filepath.Join(bins(t), "banger"), "exec", "-it", "web", "--", "sh", "-c", "tty; read x; echo got:$x")
	it.Env = append(os.Environ(), "BANGER_HOME="+h, "TERM=xterm")
	it.Stdin, it.Stdout, it.Stderr = tty, tty, tty
	it.SysProcAttr = &syscall.SysProcAttr{Setsid: true, Setctty: true}
	if err := it.Start(); err != nil {
		t.Fatal(err)
	}
	tty.Close()
	var screen lockedBuf
	go io.Copy(&screen, ptmx)
	testenv.WaitFor(t, 30*time.Second, "the guest's tty in exec -it", func() bool { return strings.Contains(screen.String(), "/dev/pts/") })
	ptmx.Write([]byte("hello\r"))
	testenv.WaitFor(t, 30*time.Second, "exec -it to read a line", func() bool { return strings.Contains(screen.String(), "got:hello") })
	if err := it.Wait(); err != nil {
		t.Fatalf("exec -it: %v\n%s", err, screen.String())
	}
}
