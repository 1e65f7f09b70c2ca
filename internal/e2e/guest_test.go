package e2e

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/bangerdev/banger/internal/guest"
	"github.com/bangerdev/banger/internal/testenv"
)

// runBin runs a program with stdin, bounded by timeout, and returns stdout,
// stderr and the exit status.
func runBin(t *testing.T, timeout time.Duration, env []string, stdin io.Reader, bin string, args ...string) (string, string, int) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin, args...)
	cmd.Env = append(os.Environ(), env...)
	cmd.Stdin = stdin
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	var ee *exec.ExitError
	if err != nil && !errors.As(err, &ee) {
		t.Fatalf("run %s %v: %v", bin, args, err)
	}
	if ctx.Err() != nil {
		t.Fatalf("%s %v did not finish within %s; stderr: %s", bin, args, timeout, errb.String())
	}
	return out.String(), errb.String(), cmd.ProcessState.ExitCode()
}

func randomFile(t *testing.T, p string, size int64, mode os.FileMode) {
	t.Helper()
	f, err := os.OpenFile(p, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, mode)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.CopyN(f, rand.Reader, size); err != nil {
		t.Fatal(err)
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	os.Chmod(p, mode)
}

func mibPerSec(n int64, d time.Duration) float64 { return float64(n) / (1 << 20) / d.Seconds() }

type statsJSON struct {
	Kept   int `json:"kept"`
	Latest *struct {
		Host *struct {
			PID        int      `json:"pid"`
			CPUPercent *float64 `json:"cpu_percent"`
			RSSBytes   uint64   `json:"rss_bytes"`
		} `json:"host"`
		Guest *struct {
			MemTotalBytes  uint64  `json:"mem_total_bytes"`
			MemUsedBytes   uint64  `json:"mem_used_bytes"`
			Load1          float64 `json:"load1"`
			DiskTotalBytes uint64  `json:"disk_total_bytes"`
			DiskUsedBytes  uint64  `json:"disk_used_bytes"`
			Uptime         int64   `json:"uptime_ns"`
		} `json:"guest"`
		GuestError string `json:"guest_error"`
	} `json:"latest"`
	History []json.RawMessage `json:"history"`
}

// TestGuestToolsRealGuest drives exec, OpenSSH through ssh-config, ports,
// port-forward, cp and stats against one real guest, and measures exec
// latency and cp vs scp throughput.
func TestGuestToolsRealGuest(t *testing.T) {
	h, d, _ := realHome(t)
	bangerBin := filepath.Join(bins(t), "banger")
	env := []string{"BANGER_HOME=" + h}
	const vmName, memMiB = "tools", 256
	if _, errOut, code := banger(t, h, "vm", "create", vmName, "--memory", fmt.Sprint(memMiB)+"M", "--disk", "512M"); code != 0 {
		t.Fatalf("create: exit %d: %s\n%s", code, errOut, d.logs.String())
	}
	t.Cleanup(func() { banger(t, h, "vm", "delete", vmName, "--force") })
	work := t.TempDir()

	t.Run("exec", func(t *testing.T) {
		out, errOut, code := runBin(t, time.Minute, env, nil, bangerBin, "exec", vmName, "--", "sh", "-c", "echo out; echo err >&2; exit 7")
		if code != 7 || out != "out\n" || errOut != "err\n" {
			t.Fatalf("exit 7: code %d stdout %q stderr %q", code, out, errOut)
		}
		// docker's flags: -e, --env-file, -w, -u, -t; stdin only with -i
		out, errOut, code = runBin(t, time.Minute, env, nil, bangerBin, "exec", "-e", "A=1", "-w", "/tmp", vmName, "--", "sh", "-c", "echo $A; pwd")
		if code != 0 || out != "1\n/tmp\n" {
			t.Fatalf("exec -e A=1 -w /tmp: code %d stdout %q stderr %q", code, out, errOut)
		}
		envFile := filepath.Join(t.TempDir(), "env")
		os.WriteFile(envFile, []byte("# vars\nB=from file\nA=overridden\n"), 0o600)
		out, _, code = runBin(t, time.Minute, env, nil, bangerBin, "exec", "--env-file", envFile, "-e", "A=flag", vmName, "--", "sh", "-c", `echo "$A/$B"`)
		if code != 0 || out != "flag/from file\n" {
			t.Fatalf("exec --env-file: code %d stdout %q", code, out)
		}
		out, _, code = runBin(t, time.Minute, env, strings.NewReader("must not be read"), bangerBin, "exec", vmName, "--", "cat")
		if code != 0 || out != "" {
			t.Fatalf("exec without -i read stdin: code %d stdout %q", code, out)
		}
		out, _, code = runBin(t, time.Minute, env, nil, bangerBin, "exec", "-u", "root", vmName, "--", "id", "-u")
		if code != 0 || strings.TrimSpace(out) != "0" {
			t.Fatalf("exec -u root: code %d stdout %q", code, out)
		}
		// the test image has only root: another user is refused by the guest
		if _, errOut, code := runBin(t, time.Minute, env, nil, bangerBin, "exec", "-u", "ghostuser", vmName, "--", "true"); code == 0 || !strings.Contains(errOut, "ghostuser") {
			t.Fatalf("exec -u ghostuser: code %d stderr %q", code, errOut)
		}
		out, _, code = runBin(t, time.Minute, env, nil, bangerBin, "exec", "-t", vmName, "--", "tty")
		if code != 0 || !strings.HasPrefix(out, "/dev/pts/") {
			t.Fatalf("exec -t: code %d stdout %q", code, out)
		}
		for _, c := range []struct {
			args []string
			code int
		}{
			{[]string{"exec", vmName, "--", "no-such-command"}, 127},
			{[]string{"exec", vmName, "--", "/etc/passwd"}, 126},
			{[]string{"exec", vmName, "--", "sh", "-c", "kill -TERM $$"}, 143},
			{[]string{"exec", "no-such-vm", "--", "true"}, 125},
			{[]string{"exec", "-w", "/no/such/dir", vmName, "--", "true"}, 125},
		} {
			if _, errOut, code := runBin(t, time.Minute, env, nil, bangerBin, c.args...); code != c.code {
				t.Errorf("banger %s: exit %d, want %d (%s)", strings.Join(c.args, " "), code, c.code, errOut)
			}
		}
		in := make([]byte, 10<<20)
		rand.Read(in)
		sum := sha256.Sum256(in)
		t0 := time.Now()
		out, errOut, code = runBin(t, 2*time.Minute, env, bytes.NewReader(in), bangerBin, "exec", "-i", vmName, "--", "sha256sum")
		f := strings.Fields(out)
		if code != 0 || len(f) < 1 || f[0] != hex.EncodeToString(sum[:]) {
			t.Fatalf("10 MiB through stdin: code %d out %q err %q, want sha256 %x", code, out, errOut, sum)
		}
		t.Logf("MEASURE 10 MiB through exec stdin in %v", time.Since(t0).Round(time.Millisecond))
		var lat []time.Duration
		for i := 0; i < 50; i++ {
			t0 := time.Now()
			if _, errOut, code := runBin(t, time.Minute, env, nil, bangerBin, "exec", vmName, "--", "true"); code != 0 {
				t.Fatalf("exec true: %d %s", code, errOut)
			}
			lat = append(lat, time.Since(t0))
		}
		sort.Slice(lat, func(i, j int) bool { return lat[i] < lat[j] })
		t.Logf("MEASURE exec round trip (banger exec VM -- true, 50 runs): median %v, min %v, p90 %v, max %v",
			lat[len(lat)/2].Round(time.Millisecond), lat[0].Round(time.Millisecond), lat[44].Round(time.Millisecond), lat[49].Round(time.Millisecond))
	})

	// OpenSSH through banger ssh-config
	cfg := filepath.Join(work, "ssh_config")
	sshHost := "banger-" + vmName // ssh-config's host names never clash with real hosts
	sshOK := false
	t.Run("ssh-config", func(t *testing.T) {
		sshBin, err := exec.LookPath("ssh")
		if err != nil {
			t.Skipf("OpenSSH client not installed: %v", err)
		}
		all := mustBanger(t, h, "ssh-config")
		one := mustBanger(t, h, "ssh-config", vmName)
		if !strings.Contains(all, "Host "+sshHost+"\n") || !strings.Contains(one, "Host "+sshHost+"\n") {
			t.Fatalf("ssh-config lacks the VM:\n%s", all)
		}
		for _, want := range []string{"StrictHostKeyChecking yes", "IdentitiesOnly yes", "ssh-proxy %h", "BANGER_HOME=" + h} {
			if !strings.Contains(one, want) {
				t.Errorf("ssh-config lacks %q:\n%s", want, one)
			}
		}
		if err := os.WriteFile(cfg, []byte(one), 0o600); err != nil {
			t.Fatal(err)
		}
		ssh := func(cfgPath string, args ...string) (string, string, int) {
			return runBin(t, time.Minute, nil, strings.NewReader(""), sshBin, append([]string{"-F", cfgPath, "-o", "BatchMode=yes"}, args...)...)
		}
		if out, errOut, code := ssh(cfg, sshHost, "echo", "hello"); code != 0 || out != "hello\n" {
			t.Fatalf("ssh -F config VM: code %d out %q err %q", code, out, errOut)
		}
		sshOK = true
		// --install: ~/.ssh/config includes the config bangerd keeps current, once
		fakeHome := filepath.Join(work, "home")
		homeEnv := []string{"BANGER_HOME=" + h, "HOME=" + fakeHome}
		for i := 0; i < 2; i++ {
			if _, errOut, code := runBin(t, time.Minute, homeEnv, nil, bangerBin, "ssh-config", "--install"); code != 0 {
				t.Fatalf("ssh-config --install: %d %s", code, errOut)
			}
		}
		userCfg := filepath.Join(fakeHome, ".ssh", "config")
		if b, err := os.ReadFile(userCfg); err != nil || strings.Count(string(b), "Include ") != 1 {
			t.Fatalf("~/.ssh/config after two installs: %v\n%s", err, b)
		}
		if uid := daemonUID(); uid != 0 {
			// bangerd (nobody) wrote the included file; OpenSSH, run here as
			// root, wants it owned by its own user, as it is when one user
			// runs both
			os.Lchown(filepath.Join(h, "ssh", "config"), os.Getuid(), os.Getgid())
		}
		if out, errOut, code := ssh(userCfg, sshHost, "echo", "included"); code != 0 || out != "included\n" {
			t.Fatalf("ssh through the installed Include: code %d out %q err %q", code, out, errOut)
		}
		// a tampered host key makes OpenSSH refuse
		m := regexp.MustCompile(`UserKnownHostsFile (\S+)`).FindStringSubmatch(one)
		if m == nil {
			t.Fatalf("no UserKnownHostsFile in:\n%s", one)
		}
		kh, err := os.ReadFile(m[1])
		if err != nil {
			t.Fatalf("known_hosts bangerd maintains: %v", err)
		}
		other, _ := guest.GenerateHostKey()
		var tampered []string
		for _, l := range strings.Split(string(kh), "\n") {
			if strings.HasPrefix(l, vmName+" ") {
				l = vmName + " " + other.AuthorizedLine()
			}
			tampered = append(tampered, l)
		}
		badKH := filepath.Join(work, "known_hosts.bad")
		os.WriteFile(badKH, []byte(strings.Join(tampered, "\n")), 0o600)
		badCfg := filepath.Join(work, "ssh_config.bad")
		os.WriteFile(badCfg, []byte(strings.ReplaceAll(one, m[1], badKH)), 0o600)
		_, errOut, code := ssh(badCfg, sshHost, "true")
		if code == 0 || !strings.Contains(errOut, "HOST IDENTIFICATION HAS CHANGED") && !strings.Contains(errOut, "Host key verification failed") {
			t.Fatalf("ssh with a tampered known_hosts: code %d err %q", code, errOut)
		}
	})

	t.Run("ports and port-forward", func(t *testing.T) {
		mustBanger(t, h, "exec", vmName, "--", "sh", "-c", "mkdir -p /root/www && echo hello-from-guest > /root/www/index.html && httpd -p 9000 -h /root/www")
		start := time.Now()
		var found map[string]any
		testenv.WaitFor(t, 2*time.Second, "port 9000 in banger ports", func() bool {
			out := mustBanger(t, h, "ports", vmName, "-o", "json")
			var res struct {
				Ports []map[string]any `json:"ports"`
			}
			if err := json.Unmarshal([]byte(out), &res); err != nil {
				t.Fatalf("ports json: %v: %q", err, out)
			}
			for _, p := range res.Ports {
				if p["port"] == float64(9000) && p["process"] == "httpd" {
					found = p
					return true
				}
			}
			return false
		})
		t.Logf("listener visible after %v: %v", time.Since(start).Round(time.Millisecond), found)
		if pid, _ := found["pid"].(float64); pid <= 0 {
			t.Errorf("no pid for the listener: %v", found)
		}
		table := mustBanger(t, h, "ports", vmName)
		if !strings.Contains(table, "PROCESS") || !strings.Contains(table, "httpd") {
			t.Errorf("ports table:\n%s", table)
		}

		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		defer cancel()
		pf := exec.CommandContext(ctx, bangerBin, "port-forward", vmName, "127.0.0.1:0:9000")
		pf.Env = append(os.Environ(), env...)
		stdout, _ := pf.StdoutPipe()
		var pfErr lockedBuf
		pf.Stderr = &pfErr
		if err := pf.Start(); err != nil {
			t.Fatal(err)
		}
		waited := make(chan struct{})
		go func() { pf.Wait(); close(waited) }()
		t.Cleanup(func() {
			pf.Process.Signal(os.Interrupt)
			select {
			case <-waited:
			case <-time.After(10 * time.Second):
				pf.Process.Kill()
				<-waited
				t.Errorf("port-forward did not stop on SIGINT")
			}
		})
		lines := make(chan string, 1)
		go func() {
			l, _ := bufio.NewReader(stdout).ReadString('\n')
			lines <- l
			io.Copy(io.Discard, stdout)
		}()
		var line string
		select {
		case line = <-lines:
		case <-time.After(30 * time.Second):
			t.Fatalf("port-forward said nothing within 30s; stderr: %s", pfErr.String())
		}
		m := regexp.MustCompile(`Forwarding (127\.0\.0\.1:\d+) -> `).FindStringSubmatch(line)
		if m == nil {
			t.Fatalf("port-forward output %q; stderr: %s", line, pfErr.String())
		}
		hc := &http.Client{Timeout: 20 * time.Second}
		for i := 0; i < 3; i++ { // several connections over the one SSH connection
			resp, err := hc.Get("http://" + m[1] + "/index.html")
			if err != nil {
				t.Fatalf("GET through port-forward: %v; stderr: %s", err, pfErr.String())
			}
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if strings.TrimSpace(string(body)) != "hello-from-guest" {
				t.Fatalf("GET through port-forward: %s %q", resp.Status, body)
			}
		}
		// OpenSSH's own local forwarding through the ssh-config path
		if sshOK {
			l, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				t.Fatal(err)
			}
			lport := l.Addr().(*net.TCPAddr).Port
			l.Close()
			sshL := exec.CommandContext(ctx, "ssh", "-F", cfg, "-o", "BatchMode=yes", "-o", "ExitOnForwardFailure=yes", "-N",
				"-L", fmt.Sprintf("127.0.0.1:%d:127.0.0.1:9000", lport), sshHost)
			var sshErr lockedBuf
			sshL.Stderr = &sshErr
			if err := sshL.Start(); err != nil {
				t.Fatal(err)
			}
			sshDone := make(chan struct{})
			go func() { sshL.Wait(); close(sshDone) }()
			defer func() {
				sshL.Process.Kill()
				<-sshDone
			}()
			var body []byte
			testenv.WaitFor(t, 20*time.Second, "a GET through ssh -L", func() bool {
				select {
				case <-sshDone:
					t.Fatalf("ssh -L exited: %s", sshErr.String())
				default:
				}
				resp, err := hc.Get(fmt.Sprintf("http://127.0.0.1:%d/index.html", lport))
				if err != nil {
					return false
				}
				body, _ = io.ReadAll(resp.Body)
				resp.Body.Close()
				return true
			})
			if strings.TrimSpace(string(body)) != "hello-from-guest" {
				t.Fatalf("GET through ssh -L: %q", body)
			}
		}
		pf.Process.Signal(os.Interrupt)
		select {
		case <-waited:
			if code := pf.ProcessState.ExitCode(); code != 0 {
				t.Errorf("port-forward exit status %d after Ctrl-C; stderr: %s", code, pfErr.String())
			}
		case <-time.After(10 * time.Second):
			t.Errorf("port-forward did not stop on SIGINT within 10s")
		}
	})

	t.Run("cp", func(t *testing.T) {
		const size = 50 << 20
		src := filepath.Join(work, "big.bin")
		randomFile(t, src, size, 0o640)
		sum := testenv.FileSHA256(t, src)

		guestCheck := func(p string) (string, string) {
			out := mustBanger(t, h, "exec", vmName, "--", "sh", "-c", "sha256sum "+p+" && stat -c %a "+p)
			f := strings.Fields(out)
			if len(f) < 3 {
				t.Fatalf("guest check of %s: %q", p, out)
			}
			return f[0], f[2]
		}
		t0 := time.Now()
		if _, errOut, code := runBin(t, 3*time.Minute, env, nil, bangerBin, "cp", src, vmName+":/root/"); code != 0 {
			t.Fatalf("cp to the guest: %d %s", code, errOut)
		}
		up := time.Since(t0)
		if gs, mode := guestCheck("/root/big.bin"); gs != sum || mode != "640" {
			t.Fatalf("in the guest: sha256 %s mode %s; want %s 640", gs, mode, sum)
		}
		back := filepath.Join(work, "back.bin")
		t0 = time.Now()
		if _, errOut, code := runBin(t, 3*time.Minute, env, nil, bangerBin, "cp", vmName+":/root/big.bin", back); code != 0 {
			t.Fatalf("cp from the guest: %d %s", code, errOut)
		}
		down := time.Since(t0)
		fi, err := os.Stat(back)
		if err != nil || testenv.FileSHA256(t, back) != sum || fi.Mode().Perm() != 0o640 {
			t.Fatalf("copied back: %v mode %v, sha256 differs: %v", err, fi.Mode(), testenv.FileSHA256(t, back) != sum)
		}
		t.Logf("MEASURE banger cp 50 MiB: host→guest %v (%.1f MiB/s), guest→host %v (%.1f MiB/s)",
			up.Round(time.Millisecond), mibPerSec(size, up), down.Round(time.Millisecond), mibPerSec(size, down))

		// directories, recursively, with modes
		tree := filepath.Join(work, "tree")
		os.MkdirAll(filepath.Join(tree, "sub"), 0o755)
		os.WriteFile(filepath.Join(tree, "a.sh"), []byte("#!/bin/sh\necho a\n"), 0o755)
		os.WriteFile(filepath.Join(tree, "sub", "b.txt"), []byte("b\n"), 0o600)
		os.Symlink("a.sh", filepath.Join(tree, "link"))
		if _, errOut, code := runBin(t, time.Minute, env, nil, bangerBin, "cp", tree, vmName+":/root/"); code != 1 || !strings.Contains(errOut, "-r") {
			t.Fatalf("cp of a directory without -r: %d %s", code, errOut)
		}
		mustBanger(t, h, "cp", "-r", tree, vmName+":/root/")
		out := mustBanger(t, h, "exec", vmName, "--", "sh", "-c", "cd /root/tree && stat -c '%n %a' a.sh sub/b.txt && readlink link && ./a.sh")
		if want := "a.sh 755\nsub/b.txt 600\na.sh\na\n"; out != want {
			t.Fatalf("tree in the guest:\n%s\nwant:\n%s", out, want)
		}
		treeBack := filepath.Join(work, "tree-back")
		mustBanger(t, h, "cp", "-r", vmName+":/root/tree", treeBack)
		if b, err := os.ReadFile(filepath.Join(treeBack, "sub", "b.txt")); err != nil || string(b) != "b\n" {
			t.Fatalf("tree back: %q %v", b, err)
		}
		if fi, err := os.Stat(filepath.Join(treeBack, "a.sh")); err != nil || fi.Mode().Perm() != 0o755 {
			t.Fatalf("tree back a.sh: %v %v", fi, err)
		}
		// clear errors
		if _, errOut, code := banger(t, h, "cp", vmName+":/nonexistent/file", work); code == 0 || !strings.Contains(errOut, "no such file") {
			t.Fatalf("cp of a missing guest file: %d %q", code, errOut)
		}

		// scp through the ssh-config path, same file, for comparison
		scpBin, err := exec.LookPath("scp")
		if err != nil || !sshOK {
			t.Logf("scp comparison skipped (scp: %v, ssh-config worked: %v)", err, sshOK)
			return
		}
		t0 = time.Now()
		if _, errOut, code := runBin(t, 3*time.Minute, nil, nil, scpBin, "-F", cfg, "-o", "BatchMode=yes", "-q", "-p", src, sshHost+":/root/scp.bin"); code != 0 {
			t.Fatalf("scp to the guest: %d %s", code, errOut)
		}
		scpUp := time.Since(t0)
		if gs, _ := guestCheck("/root/scp.bin"); gs != sum {
			t.Fatalf("scp to the guest corrupted the file")
		}
		scpBack := filepath.Join(work, "scp-back.bin")
		t0 = time.Now()
		if _, errOut, code := runBin(t, 3*time.Minute, nil, nil, scpBin, "-F", cfg, "-o", "BatchMode=yes", "-q", "-p", sshHost+":/root/scp.bin", scpBack); code != 0 {
			t.Fatalf("scp from the guest: %d %s", code, errOut)
		}
		scpDown := time.Since(t0)
		if testenv.FileSHA256(t, scpBack) != sum {
			t.Fatalf("scp from the guest corrupted the file")
		}
		t.Logf("MEASURE 50 MiB host→guest: banger cp %.1f MiB/s, scp %.1f MiB/s; guest→host: banger cp %.1f MiB/s, scp %.1f MiB/s",
			mibPerSec(size, up), mibPerSec(size, scpUp), mibPerSec(size, down), mibPerSec(size, scpDown))
		mustBanger(t, h, "exec", vmName, "--", "rm", "-f", "/root/big.bin", "/root/scp.bin")
	})

	t.Run("stats", func(t *testing.T) {
		get := func() statsJSON {
			var s statsJSON
			out := mustBanger(t, h, "stats", vmName, "-o", "json")
			if err := json.Unmarshal([]byte(out), &s); err != nil {
				t.Fatalf("stats json: %v: %q", err, out)
			}
			return s
		}
		first := get()
		if first.Latest == nil || first.Latest.Host == nil || first.Latest.Guest == nil {
			t.Fatalf("stats lacks a host or guest view: %+v", first)
		}
		l := first.Latest
		if l.Host.RSSBytes == 0 || l.Host.PID <= 0 {
			t.Errorf("host view: %+v", *l.Host)
		}
		vmMem := uint64(memMiB) << 20
		if g := l.Guest; g.MemTotalBytes < vmMem*6/10 || g.MemTotalBytes > vmMem || g.MemUsedBytes == 0 || g.MemUsedBytes > g.MemTotalBytes {
			t.Errorf("guest memory: used %d of %d, VM has %d", g.MemUsedBytes, g.MemTotalBytes, vmMem)
		}
		if g := l.Guest; g.DiskTotalBytes == 0 || g.DiskUsedBytes > g.DiskTotalBytes || g.Uptime <= 0 {
			t.Errorf("guest disk/uptime: %+v", *g)
		}
		if len(first.History) != first.Kept {
			t.Errorf("history has %d samples, kept says %d", len(first.History), first.Kept)
		}
		var later statsJSON
		testenv.WaitFor(t, 10*time.Second, "stats history to grow", func() bool {
			later = get()
			return later.Kept > first.Kept
		})
		if later.Latest.Host.CPUPercent == nil {
			t.Errorf("no CPU figure after %d samples", later.Kept)
		}
		table := mustBanger(t, h, "stats", vmName)
		for _, want := range []string{"VMM", "pid", "Memory", "Load", "Disk", "Uptime"} {
			if !strings.Contains(table, want) {
				t.Errorf("stats table lacks %q:\n%s", want, table)
			}
		}
		t.Logf("stats: %d samples kept; latest: VMM RSS %d MiB, CPU %.1f%%; guest mem %d/%d MiB\n%s", later.Kept,
			later.Latest.Host.RSSBytes>>20, *later.Latest.Host.CPUPercent, later.Latest.Guest.MemUsedBytes>>20, later.Latest.Guest.MemTotalBytes>>20, table)
		// --watch prints samples until interrupted
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		w := exec.CommandContext(ctx, bangerBin, "stats", vmName, "--watch")
		w.Env = append(os.Environ(), env...)
		var wout lockedBuf
		w.Stdout, w.Stderr = &wout, &wout
		if err := w.Start(); err != nil {
			t.Fatal(err)
		}
		testenv.WaitFor(t, 10*time.Second, "two rows from stats --watch", func() bool { return strings.Count(wout.String(), "\n") >= 3 })
		w.Process.Signal(syscall.SIGINT)
		if err := w.Wait(); err != nil {
			t.Errorf("stats --watch after SIGINT: %v\n%s", err, wout.String())
		}
	})
}
