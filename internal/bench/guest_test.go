package bench

import (
	"context"
	"crypto/rand"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/bangerdev/banger/client"
	"github.com/bangerdev/banger/internal/image"
	"github.com/bangerdev/banger/internal/testenv"
)

// Today's rates (issue 13, quiet machine): the targets are 3× these.
const (
	cpTodayMiBs    = 19.7
	stdinTodayMiBs = 24.2
)

// benchGuest: exec latency, exec stdin, cp both ways, workspaces; each
// against OpenSSH through `banger ssh-config` with a live ControlMaster, or
// tar through exec.
func (b *bench) benchGuest() {
	const vm = "g"
	// 4 GiB: room for two 100 MiB payloads and the workspaces (sparse, and
	// no slower to make than 256 MiB).
	if _, _, _, err := b.createVM(vm, 4096); err != nil {
		b.fail("guest", "create the guest", err)
		return
	}
	defer b.deleteVM(vm)
	cfg := filepath.Join(b.tmp, "ssh_config")
	out, err := b.cli(time.Minute, nil, "ssh-config", vm)
	if err == nil {
		err = os.WriteFile(cfg, []byte(out), 0o600)
	}
	if err != nil {
		b.fail("guest", "ssh-config", err)
		return
	}
	// The entry's name (banger-<vm> or <vm>, depending on the CLI).
	alias := ""
	for _, l := range strings.Split(out, "\n") {
		if f := strings.Fields(l); len(f) == 2 && f[0] == "Host" {
			alias = f[1]
			break
		}
	}
	if alias == "" {
		b.fail("guest", "ssh-config", fmt.Errorf("no Host entry in:\n%s", out))
		return
	}
	cm := filepath.Join(b.tmp, "cm-%C")
	sshArgs := []string{"-F", cfg, "-o", "ControlMaster=auto", "-o", "ControlPath=" + cm, "-o", "ControlPersist=600", "-o", "BatchMode=yes"}
	ssh := "ssh " + strings.Join(quoteAll(sshArgs), " ")
	scp := "scp -q " + strings.Join(quoteAll(sshArgs), " ")
	// Open the master connection (not timed).
	if _, err := b.sh(2*time.Minute, ssh+" "+alias+" true"); err != nil {
		b.fail("guest", "OpenSSH through ssh-config", err)
		return
	}
	defer exec.Command("ssh", append(sshArgs, "-O", "exit", alias)...).Run()
	if b.want("guest") || b.want("exec") {
		b.benchExecLatency(vm, alias, ssh)
	}
	if b.want("guest") {
		b.benchExecCp(vm, alias, ssh, scp)
	} else if b.want("bulk") {
		b.benchTransfers(vm, alias, ssh, scp)
	}
	if b.want("guest") || b.want("workspace") {
		b.benchWorkspace(vm, alias, ssh)
	}
}

// benchExecLatency: exec true against ssh through the ControlMaster, and
// what it is made of (scripts/bench --only exec runs these rows alone).
func (b *bench) benchExecLatency(vm, alias, ssh string) {
	n := b.runs()
	if !b.quick && !b.want("guest") {
		n = 60 // alone, there is time for more samples
	}
	// Interleaved, one of each in turn, so that both see the same load.
	bx, sx, err := timeBoth(n,
		func() error { _, err := b.cli(time.Minute, nil, "exec", vm, "--", "true"); return err },
		func() error { _, err := b.sh(time.Minute, ssh+" "+alias+" true"); return err })
	if err != nil {
		b.fail("guest", "exec true", err)
	} else {
		bm, sm := testenv.Median(bx), testenv.Median(sx)
		b.add(Result{Group: "guest", Metric: "exec true", Unit: "ms", Banger: bm, Baseline: sm, Base: "ssh -F ssh-config with a live ControlMaster (runs interleaved)",
			Target: "≤1.0×", Pass: passIf(bm <= sm), N: n, Samples: bx, BaseSmp: sx})
	}

	// What exec paid every time before the bulk path (and banger ssh still
	// pays): an SSH handshake with the agent in the guest.
	hs, err := timeN(n, func() error {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		c, err := b.cl.SSH(ctx, vm, "")
		if err == nil {
			c.Close()
		}
		return err
	})
	if err != nil {
		b.fail("guest", "SSH handshake", err)
	} else {
		b.add(Result{Group: "guest", Metric: "  SSH handshake with the agent", Unit: "ms", Banger: testenv.Median(hs), N: n, Samples: hs,
			Note: "client.SSH in-process (connect through bangerd + key exchange + auth): what banger ssh pays, and exec before the bulk path; OpenSSH's ControlMaster pays it once"})
	}

	// The same through the public client in-process: no CLI process.
	ix, err := timeN(n, func() error {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		code, err := b.cl.Exec(ctx, vm, []string{"true"}, client.ExecOptions{})
		if err == nil && code != 0 {
			err = fmt.Errorf("exit %d", code)
		}
		return err
	})
	if err != nil {
		b.fail("guest", "client.Exec", err)
	} else {
		b.add(Result{Group: "guest", Metric: "  exec true in-process (client.Exec)", Unit: "ms", Banger: testenv.Median(ix), N: n, Samples: ix,
			Note: "the CLI's share is the difference from exec true"})
	}

	// The CLI process alone: start, command tree, exit (no RPC).
	vx, err := timeN(n, func() error { _, err := b.cli(time.Minute, nil, "version"); return err })
	if err != nil {
		b.fail("guest", "banger version", err)
	} else {
		b.add(Result{Group: "guest", Metric: "  banger version (the CLI process alone)", Unit: "ms", Banger: testenv.Median(vx), N: n, Samples: vx,
			Note: "process start, package inits, the command tree; no RPC"})
	}
}

// benchExecCp: the transfers (see benchTransfers).
func (b *bench) benchExecCp(vm, alias, ssh, scp string) {
	b.benchTransfers(vm, alias, ssh, scp)
}

// benchTransfers: the raw channel, the guest's own disk, exec stdin and cp
// both ways, against ssh/scp with a ControlMaster (scripts/bench --only
// bulk runs these alone).
func (b *bench) benchTransfers(vm, alias, ssh, scp string) {
	// Payloads.
	mib := 100
	reps := 3 // a median: one transfer moves by ±30% from one to the next here
	if b.quick {
		mib, reps = 8, 1
	}
	payload := filepath.Join(b.tmp, "payload")
	if err := randomFile(payload, int64(mib)<<20); err != nil {
		b.fail("guest", "payload", err)
		return
	}
	rate := func(ds []float64) float64 { return float64(mib) / (testenv.Median(ds) / 1000) }
	// Before every timed transfer, untimed: a sync in the guest, then on
	// the host. No transfer pays for the writeback of the one before it (an
	// scp's or an exec's 100 MiB left dirty in the guest's page cache,
	// written back while the next one runs: a cp in after one took 414–849
	// ms here, after a sync 265–351), both arms alike.
	settle := func() error {
		if _, err := b.cli(time.Minute, nil, "exec", vm, "--", "sync"); err != nil {
			return fmt.Errorf("sync in the guest: %w", err)
		}
		return hostSync()
	}
	var raw map[bool]float64
	// ceiling: what the guest's own consumer does with no channel (see
	// local below), when the row has one.
	ceiling := map[string]float64{}
	transfer := func(metric, base, target string, want float64, toGuest bool, banger, baseline string, ceilingOf string) {
		bs, err := timeNPrep(reps, settle, func() error { _, err := b.sh(10*time.Minute, banger); return err })
		if err != nil {
			b.fail("guest", metric, err)
			return
		}
		ss, err := timeNPrep(reps, settle, func() error { _, err := b.sh(10*time.Minute, baseline); return err })
		if err != nil {
			b.fail("guest", metric+" (baseline)", err)
			return
		}
		r := Result{Group: "guest", Metric: fmt.Sprintf("%s %d MiB", metric, mib), Unit: "MiB/s", Banger: rate(bs), Baseline: rate(ss),
			Base: base, Target: target, N: reps, Samples: bs, BaseSmp: ss, Note: "samples are ms"}
		if rw := raw[toGuest]; rw > 0 {
			r.Note = fmt.Sprintf("%.0f%% of the raw channel (target ≥80%%); samples are ms", 100*r.Banger/rw)
			if c := ceiling[ceilingOf]; c > 0 {
				r.Note = fmt.Sprintf("%.0f%% of the raw channel (target ≥80%%), %.0f%% of the guest alone's %s; samples are ms", 100*r.Banger/rw, 100*r.Banger/c, ceilingOf)
			}
		}
		if want > 0 {
			r.Pass = passIf(r.Banger >= want)
		}
		b.add(r)
	}
	// The raw channel: unframed, unencrypted bytes between this process and
	// the agent through bangerd (client.ChannelThroughput): the physical
	// limit of everything the bulk path carries. Targets below: ≥80% of it.
	raw = map[bool]float64{}
	for _, toGuest := range []bool{true, false} {
		name := "raw channel guest→host"
		if toGuest {
			name = "raw channel host→guest"
		}
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
		var ds []float64
		var err error
		for range reps {
			var d time.Duration
			if err = settle(); err != nil {
				break
			}
			if d, err = b.cl.ChannelThroughput(ctx, vm, toGuest, int64(mib)<<20); err != nil {
				break
			}
			ds = append(ds, float64(d.Microseconds())/1000)
		}
		cancel()
		if err != nil {
			b.fail("guest", name, err)
			continue
		}
		raw[toGuest] = rate(ds)
		b.add(Result{Group: "guest", Metric: fmt.Sprintf("%s %d MiB", name, mib), Unit: "MiB/s", Banger: raw[toGuest],
			Base: "-", N: reps, Samples: ds, Note: "the physical limit (vm.bulk zero/sink); samples are ms"})
	}
	// The guest's own limits: what its filesystem does with no channel at
	// all (run in the guest through exec; each includes one exec round
	// trip, a few ms). A copy into the guest cannot beat them.
	local := func(metric, setup, script string) {
		// The setup (removing the file, dropping caches) and the syncs
		// after it are not timed.
		ds, err := timeNPrep(3, func() error {
			if setup != "" {
				if _, err := b.cli(5*time.Minute, nil, "exec", vm, "--", "sh", "-c", setup); err != nil {
					return err
				}
			}
			return settle()
		}, func() error {
			_, err := b.cli(5*time.Minute, nil, "exec", vm, "--", "sh", "-c", script)
			return err
		})
		if err != nil {
			b.fail("guest", metric, err)
			return
		}
		ceiling[metric] = rate(ds)
		b.add(Result{Group: "guest", Metric: fmt.Sprintf("  guest alone: %s %d MiB", metric, mib), Unit: "MiB/s", Banger: rate(ds), Base: "-", N: 3, Samples: ds,
			Note: "in the guest, no channel: " + script + "; samples are ms"})
	}
	local("write (dd bs=1M, no fsync)", "rm -f /root/dz", fmt.Sprintf("dd if=/dev/zero of=/root/dz bs=1M count=%d 2>/dev/null", mib))
	local("write (dd bs=1M conv=fsync)", "rm -f /root/dz", fmt.Sprintf("dd if=/dev/zero of=/root/dz bs=1M count=%d conv=fsync 2>/dev/null", mib))
	local("write through a pipe (dd | cat > f)", "rm -f /root/dz", fmt.Sprintf("dd if=/dev/zero bs=1M count=%d 2>/dev/null | cat > /root/dz", mib))
	local("pipe into a discarding cat (dd | cat > /dev/null)", "", fmt.Sprintf("dd if=/dev/zero bs=1M count=%d 2>/dev/null | cat > /dev/null", mib))
	local("read (cat f, caches dropped)", fmt.Sprintf("dd if=/dev/zero of=/root/dz bs=1M count=%d conv=fsync 2>/dev/null && echo 3 > /proc/sys/vm/drop_caches", mib),
		"cat /root/dz > /dev/null")
	// What cp's put and get do with the file (O_DIRECT, see package bulk).
	local("write (dd bs=1M oflag=direct)", "rm -f /root/dz", fmt.Sprintf("dd if=/dev/zero of=/root/dz bs=1M count=%d oflag=direct 2>/dev/null", mib))
	local("read (dd bs=1M iflag=direct, caches dropped)", "sync && echo 3 > /proc/sys/vm/drop_caches", "dd if=/root/dz of=/dev/null bs=1M iflag=direct 2>/dev/null")
	b.cli(time.Minute, nil, "exec", vm, "--", "rm", "-f", "/root/dz")

	p := shq(payload)
	transfer("exec stdin", "ssh (ControlMaster) cat >", fmt.Sprintf("≥%.0f (3× today)", 3*stdinTodayMiBs), 3*stdinTodayMiBs, true,
		`"$BANGER" exec -i `+vm+` -- sh -c 'cat > /root/in' < `+p,
		ssh+" "+alias+" 'cat > /root/in2' < "+p, "write through a pipe (dd | cat > f)")
	b.cli(time.Minute, nil, "exec", vm, "--", "rm", "-f", "/root/in", "/root/in2")
	transfer("exec stdin into a discarding cat", "ssh (ControlMaster) cat > /dev/null", "", 0, true,
		`"$BANGER" exec -i `+vm+` -- sh -c 'cat > /dev/null' < `+p,
		ssh+" "+alias+" 'cat > /dev/null' < "+p, "pipe into a discarding cat (dd | cat > /dev/null)")
	transfer("cp host→guest", "scp through ssh-config (ControlMaster)", fmt.Sprintf("≥%.0f (3× today)", 3*cpTodayMiBs), 3*cpTodayMiBs, true,
		`"$BANGER" cp -q `+p+" "+vm+":/root/cp1",
		scp+" "+p+" "+alias+":/root/cp2", "write (dd bs=1M oflag=direct)")
	back := shq(filepath.Join(b.tmp, "back"))
	transfer("cp guest→host", "scp through ssh-config (ControlMaster)", fmt.Sprintf("≥%.0f (3× today)", 3*cpTodayMiBs), 3*cpTodayMiBs, false,
		`rm -f `+back+`; "$BANGER" cp -q `+vm+":/root/cp1 "+back,
		`rm -f `+back+"; "+scp+" "+alias+":/root/cp2 "+back, "")
	// One small file each way: what a cp costs when there is next to
	// nothing to carry (the spool must not make it dearer).
	small := filepath.Join(b.tmp, "small")
	if err := randomFile(small, 1000); err != nil {
		b.fail("guest", "small file", err)
	} else {
		n := 20
		if b.quick {
			n = 3
		}
		sp, sb := shq(small), shq(filepath.Join(b.tmp, "small-back"))
		latency := func(metric, banger, baseline string) {
			bs, err := timeN(n, func() error { _, err := b.sh(time.Minute, banger); return err })
			if err != nil {
				b.fail("guest", metric, err)
				return
			}
			ss, err := timeN(n, func() error { _, err := b.sh(time.Minute, baseline); return err })
			if err != nil {
				b.fail("guest", metric+" (baseline)", err)
				return
			}
			b.add(Result{Group: "guest", Metric: metric, Unit: "ms", Banger: testenv.Median(bs), Baseline: testenv.Median(ss),
				Base: "scp through ssh-config (ControlMaster)", N: n, Samples: bs, BaseSmp: ss})
		}
		latency("cp of a 1000-byte file host→guest", `"$BANGER" cp -q `+sp+" "+vm+":/root/s1", scp+" "+sp+" "+alias+":/root/s2")
		latency("cp of a 1000-byte file guest→host", `rm -f `+sb+`; "$BANGER" cp -q `+vm+":/root/s1 "+sb, `rm -f `+sb+"; "+scp+" "+alias+":/root/s2 "+sb)
		os.Remove(small)
		os.Remove(filepath.Join(b.tmp, "small-back"))
	}
	b.cli(time.Minute, nil, "exec", vm, "--", "rm", "-f", "/root/in", "/root/in2", "/root/cp1", "/root/cp2", "/root/s1", "/root/s2")
	os.Remove(payload)
	os.Remove(filepath.Join(b.tmp, "back"))
}

func (b *bench) benchWorkspace(vm, alias, ssh string) {
	files, size := 1000, 64<<10
	// Push and its baseline alternate, so that both see the same load;
	// five rounds, as the tar baseline alone spreads widely on a shared
	// machine.
	reps := 5
	if b.quick {
		files, size, reps = 50, 16<<10, 1
	}
	repo := filepath.Join(b.tmp, "repo")
	if err := makeRepo(repo, files, size); err != nil {
		b.fail("workspace", "make the repository", err)
		return
	}
	desc := fmt.Sprintf("%d files × %d KiB", files, size>>10)
	r := shq(repo)
	// Before every timed operation of these rows, an untimed sync in the
	// guest: no operation pays for the writeback of the one before it (the
	// previous push's 125 MiB or tar's 64 MiB still dirty in the guest's
	// page cache), both arms alike.
	settle := func() error {
		_, err := b.cli(time.Minute, nil, "exec", vm, "--", "sync")
		return err
	}
	timed := func(script string) (float64, error) {
		if err := settle(); err != nil {
			return 0, fmt.Errorf("sync in the guest: %w", err)
		}
		start := time.Now()
		_, err := b.sh(10*time.Minute, script)
		return ms(time.Since(start)), err
	}
	push := `"$BANGER" exec ` + vm + ` -- rm -rf /root/ws; "$BANGER" workspace push ` + vm + " " + r + " --dest /root/ws >/dev/null"
	tarPush := `cd ` + r + ` && git ls-files -z | tar --null -T - -cf - | "$BANGER" exec -i ` + vm + ` -- sh -c 'rm -rf /root/wt && mkdir -p /root/wt && tar xf - -C /root/wt'`
	// The same tar through OpenSSH (ControlMaster, through ssh-config): the
	// transport banger exec had when the issue measured its baseline
	// (5.1-6.4 s), before exec moved to the bulk channel.
	tarSSH := `cd ` + r + ` && git ls-files -z | tar --null -T - -cf - | ` + ssh + " " + alias + ` 'rm -rf /root/wt2 && mkdir -p /root/wt2 && tar xf - -C /root/wt2'`
	// Each push starts from an empty destination; the rm is timed on all sides.
	var bp, tp, sp, ratios, sratios []float64
	for range reps {
		d, err := timed(push)
		if err != nil {
			b.fail("workspace", "workspace push", err)
			return
		}
		bp = append(bp, d)
		if d, err = timed(tarPush); err != nil {
			b.fail("workspace", "tar | exec tar x", err)
			return
		}
		tp = append(tp, d)
		ratios = append(ratios, bp[len(bp)-1]/d)
		if d, err = timed(tarSSH); err != nil {
			b.fail("workspace", "tar | ssh tar x", err)
			return
		}
		sp = append(sp, d)
		sratios = append(sratios, bp[len(bp)-1]/d)
	}
	b.cli(time.Minute, nil, "exec", vm, "--", "rm", "-rf", "/root/wt2")
	b.add(Result{Group: "workspace", Metric: "workspace push (" + desc + ") vs tar over SSH", Unit: "ms", Banger: testenv.Median(bp), Baseline: testenv.Median(sp),
		Base: "git ls-files | tar c | ssh (ControlMaster, ssh-config) tar x", N: reps, Samples: bp, BaseSmp: sp,
		Note: fmt.Sprintf("informational (the target is the next row's): the issue's baseline as measured then, when exec ran over SSH; same rounds as the next row; median of the per-round ratios %.2f× (%s)",
			testenv.Median(sratios), fmtRatios(sratios))})
	b.add(Result{Group: "workspace", Metric: "workspace push (" + desc + ")", Unit: "ms", Banger: testenv.Median(bp), Baseline: testenv.Median(tp),
		Base: "git ls-files | tar c | banger exec -i tar x", Target: "≤0.5×", Pass: passIf(testenv.Median(bp) <= 0.5*testenv.Median(tp)), N: reps, Samples: bp, BaseSmp: tp,
		Note: fmt.Sprintf("median of the per-round ratios %.2f× (%s); a guest sync before each timed op; push also sends .git; its objects go into one pack in the guest, the blobs written from the files' data, not sent again",
			testenv.Median(ratios), fmtRatios(ratios))})

	// Re-push after a one-file change.
	var repush []float64
	for i := range reps {
		if err := os.WriteFile(filepath.Join(repo, "f0000.txt"), []byte(fmt.Sprintf("change %d\n", i+1)), 0o644); err != nil {
			b.fail("workspace", "workspace re-push", err)
			return
		}
		d, err := timed(`"$BANGER" workspace push ` + vm + " " + r + " --dest /root/ws >/dev/null")
		if err != nil {
			b.fail("workspace", "workspace re-push", err)
			return
		}
		repush = append(repush, d)
	}
	b.add(Result{Group: "workspace", Metric: "workspace re-push after a one-file change", Unit: "ms", Banger: testenv.Median(repush), Baseline: testenv.Median(tp),
		Base: "tar | exec of the whole tree", Target: "<300 ms", Pass: passIf(testenv.Median(repush) < 300), N: reps, Samples: repush, BaseSmp: tp})

	// Pull (a branch in the host repository) vs tar c through exec.
	pullDir := shq(filepath.Join(b.tmp, "pulled"))
	pull := `git -C ` + r + ` branch -D banger/` + vm + ` >/dev/null 2>&1 || true; "$BANGER" workspace pull ` + vm + " --dest /root/ws --repo " + r + " >/dev/null"
	tarPull := `rm -rf ` + pullDir + ` && mkdir -p ` + pullDir + ` && "$BANGER" exec ` + vm + ` -- tar cf - -C /root/wt . | tar xf - -C ` + pullDir
	pullReps := 3 // a pull after a push moves little: cheap enough for a median
	if b.quick {
		pullReps = 1
	}
	timeSettled := func(n int, script string) ([]float64, error) {
		var out []float64
		for range n {
			d, err := timed(script)
			if err != nil {
				return out, err
			}
			out = append(out, d)
		}
		return out, nil
	}
	bl, err := timeSettled(pullReps, pull)
	if err != nil {
		b.fail("workspace", "workspace pull", err)
	} else {
		r := Result{Group: "workspace", Metric: "workspace pull (" + desc + ")", Unit: "ms", Banger: testenv.Median(bl),
			Base: "banger exec tar c | tar x", Target: "<1.0×", N: pullReps, Samples: bl, Note: b.pullPhases(vm, repo)}
		if tl, err := timeSettled(pullReps, tarPull); err != nil {
			r.Note = "the baseline failed: " + firstLine(err.Error())
		} else {
			r.Baseline, r.BaseSmp, r.Pass = testenv.Median(tl), tl, passIf(testenv.Median(bl) < testenv.Median(tl))
		}
		b.add(r)
	}

	// rsync over ssh-config, when both ends have it.
	_, herr := exec.LookPath("rsync")
	_, gerr := b.cli(time.Minute, nil, "exec", vm, "--", "sh", "-c", "command -v rsync")
	if herr != nil || gerr != nil {
		b.add(Result{Group: "workspace", Metric: "rsync over ssh-config", Note: "not measured: rsync missing on the host or in the guest image (busybox)"})
		return
	}
	rs, err := timeSettled(reps, `rsync -a -e `+shq(ssh)+` `+r+`/ `+alias+`:/root/wr/`)
	if err != nil {
		b.fail("workspace", "rsync", err)
		return
	}
	b.add(Result{Group: "workspace", Metric: "workspace push vs rsync", Unit: "ms", Banger: testenv.Median(bp), Baseline: testenv.Median(rs),
		Base: "rsync -a over ssh-config (ControlMaster)", N: reps, Samples: bp, BaseSmp: rs})
}

// fmtRatios: "0.52, 0.48, …" for a Note.
func fmtRatios(rs []float64) string {
	out := make([]string, len(rs))
	for i, r := range rs {
		out[i] = fmt.Sprintf("%.2f", r)
	}
	return strings.Join(out, ", ")
}

// benchImage: building an image from a tar (banger's rootless builder) vs
// tar -x + mkfs.ext4 -d.
func (b *bench) benchImage() {
	srcs := []string{"/usr/share/zoneinfo", "/usr/bin", "/usr/share/perl", "/usr/lib/python3"}
	reps := 2
	if b.quick {
		srcs, reps = []string{"/usr/share/zoneinfo"}, 1
	}
	var have []string
	for _, s := range srcs {
		if _, err := os.Stat(s); err == nil {
			have = append(have, strings.TrimPrefix(s, "/"))
		}
	}
	tarball := filepath.Join(b.tmp, "tree.tar")
	if _, err := b.sh(10*time.Minute, "tar -C / -cf "+shq(tarball)+" "+strings.Join(have, " ")); err != nil {
		b.fail("image", "make the tar", err)
		return
	}
	defer os.Remove(tarball)
	st, _ := os.Stat(tarball)
	var size int64
	bs, err := timeN(reps, func() error {
		work, err := os.MkdirTemp(b.tmp, "img")
		if err != nil {
			return err
		}
		defer os.RemoveAll(work)
		f, err := os.Open(tarball)
		if err != nil {
			return err
		}
		defer f.Close()
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
		defer cancel()
		res, err := image.FromTar(ctx, f, work, filepath.Join(work, "rootfs.ext4"), image.BuildOptions{})
		if err == nil {
			size = res.SizeBytes
		}
		return err
	})
	if err != nil {
		b.fail("image", "image build", err)
		return
	}
	ts, err := timeN(reps, func() error {
		work, err := os.MkdirTemp(b.tmp, "tar")
		if err != nil {
			return err
		}
		defer os.RemoveAll(work)
		w := shq(work)
		_, err = b.sh(10*time.Minute, fmt.Sprintf("mkdir %s/t && tar -xpf %s -C %s/t && truncate -s %d %s/f && mkfs.ext4 -q -F -d %s/t %s/f",
			w, shq(tarball), w, size, w, w, w))
		return err
	})
	if err != nil {
		b.fail("image", "tar -x + mkfs.ext4 -d", err)
		return
	}
	b.add(Result{Group: "image", Metric: fmt.Sprintf("image from a %d MiB tar", st.Size()>>20), Unit: "ms", Banger: testenv.Median(bs), Baseline: testenv.Median(ts),
		Base: "tar -xp + mkfs.ext4 -d (needs root for owners)", N: reps, Samples: bs, BaseSmp: ts,
		Note: "banger: internal/image.FromTar, the builder behind image import; " + strings.Join(have, " ")})
}

// --- helpers ---

func shq(s string) string { return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'" }

func quoteAll(ss []string) []string {
	out := make([]string, len(ss))
	for i, s := range ss {
		out[i] = shq(s)
	}
	return out
}

func randomFile(p string, n int64) error {
	f, err := os.Create(p)
	if err != nil {
		return err
	}
	defer f.Close()
	buf := make([]byte, 1<<20)
	for n > 0 {
		c := min(n, int64(len(buf)))
		rand.Read(buf[:c])
		if _, err := f.Write(buf[:c]); err != nil {
			return err
		}
		n -= c
	}
	return f.Close()
}

// makeRepo makes a git repository of files random files of size bytes in
// 10 directories, committed.
func makeRepo(dir string, files, size int) error {
	buf := make([]byte, size)
	for i := 0; i < files; i++ {
		p := filepath.Join(dir, fmt.Sprintf("d%d", i%10), fmt.Sprintf("f%04d.txt", i))
		if i == 0 {
			p = filepath.Join(dir, "f0000.txt")
		}
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			return err
		}
		rand.Read(buf)
		if err := os.WriteFile(p, buf, 0o644); err != nil {
			return err
		}
	}
	for _, args := range [][]string{
		{"init", "-q"}, {"add", "-A"},
		{"-c", "user.name=bench", "-c", "user.email=bench@example.invalid", "commit", "-qm", "bench"},
	} {
		cmd := exec.Command("git", args...)
		cmd.Dir = dir
		if out, err := cmd.CombinedOutput(); err != nil {
			return fmt.Errorf("git %v: %v: %s", args, err, out)
		}
	}
	return nil
}

// firstLine is the last line of the first paragraph of a shell error: the
// command's own complaint, without the script.
func firstLine(s string) string {
	if i := strings.Index(s, ": error: "); i >= 0 {
		s = s[i+2:]
	}
	if i := strings.IndexByte(s, '\n'); i >= 0 {
		s = s[:i]
	}
	return s
}

// pullPhases runs one more pull in-process and returns where its time went
// (the workspace pull phases client and workspace log at Debug level).
func (b *bench) pullPhases(vm, repo string) string {
	var mu sync.Mutex
	var parts []string
	h := phaseHandler{add: func(p string, ms float64) {
		mu.Lock()
		parts = append(parts, fmt.Sprintf("%s %.0f", p, ms))
		mu.Unlock()
	}}
	old := slog.Default()
	slog.SetDefault(slog.New(h))
	defer slog.SetDefault(old)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	exec.Command("git", "-C", repo, "branch", "-D", "banger/"+vm).Run()
	if _, err := b.cl.WorkspacePull(ctx, vm, vm, repo, "/root/ws"); err != nil {
		return "phases: " + firstLine(err.Error())
	}
	return "phases (ms): " + strings.Join(parts, ", ")
}

// phaseHandler collects "workspace pull phase" records.
type phaseHandler struct{ add func(string, float64) }

func (phaseHandler) Enabled(context.Context, slog.Level) bool { return true }
func (h phaseHandler) Handle(_ context.Context, r slog.Record) error {
	if r.Message != "workspace pull phase" {
		return nil
	}
	var p string
	var ms float64
	r.Attrs(func(a slog.Attr) bool {
		switch a.Key {
		case "phase":
			p = a.Value.String()
		case "ms":
			ms = a.Value.Float64()
		}
		return true
	})
	h.add(p, ms)
	return nil
}
func (h phaseHandler) WithAttrs([]slog.Attr) slog.Handler { return h }
func (h phaseHandler) WithGroup(string) slog.Handler      { return h }
