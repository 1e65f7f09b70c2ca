package qemu

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// fakeQEMU writes an executable shell script standing in for QEMU.
func fakeQEMU(t *testing.T, script string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "qemu-system-x86_64")
	if err := os.WriteFile(p, []byte("#!/bin/sh\n"+script+"\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestProbeKVMOutcomes(t *testing.T) {
	if _, err := os.Stat("/bin/sh"); err != nil {
		t.Skipf("no /bin/sh for the fake qemu: %v", err)
	}
	tests := []struct {
		name      string
		script    string
		wantAccel string
		wantWhy   string
		maxTime   time.Duration
	}{
		{
			name:      "kernel reaches its root panic",
			script:    `echo "[    0.000000] Linux version 6.1"; echo "[    0.4] Kernel panic - not syncing: VFS: Unable to mount root fs"; exec sleep 30`,
			wantAccel: AccelKVM, wantWhy: "KVM works", maxTime: 3 * time.Second,
		},
		{
			name:      "kernel panics and qemu exits by itself",
			script:    `echo "Linux version 6.1"; exit 0`,
			wantAccel: AccelKVM, wantWhy: "KVM works", maxTime: 3 * time.Second,
		},
		{
			name:      "qemu aborts on an MSR",
			script:    `echo "qemu-system-x86_64: error: failed to set MSR 0x10a to 0x69" >&2; echo "kvm.c:3183: kvm_buf_set_msrs: Assertion failed." >&2; kill -ABRT $$`,
			wantAccel: AccelTCG, wantWhy: "failed to set MSR 0x10a", maxTime: 3 * time.Second,
		},
		{
			name:      "silent hang",
			script:    `exec sleep 30`,
			wantAccel: AccelTCG, wantWhy: "printed nothing within 500ms", maxTime: 3 * time.Second,
		},
		{
			name:      "kernel starts then hangs",
			script:    `echo "Linux version 6.1"; exec sleep 30`,
			wantAccel: AccelTCG, wantWhy: "did not finish booting within 500ms", maxTime: 3 * time.Second,
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			bin := fakeQEMU(t, tc.script)
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			start := time.Now()
			c, err := probeKVM(ctx, bin, "/nonexistent/vmlinux", 500*time.Millisecond)
			if err != nil {
				t.Fatal(err)
			}
			if took := time.Since(start); took > tc.maxTime {
				t.Errorf("probe took %v", took)
			}
			if c.Accel != tc.wantAccel || !strings.Contains(c.Reason, tc.wantWhy) {
				t.Fatalf("got %+v, want %s because %q", c, tc.wantAccel, tc.wantWhy)
			}
		})
	}
}

func TestProbeKVMCallerCancel(t *testing.T) {
	bin := fakeQEMU(t, `exec sleep 30`)
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	if _, err := probeKVM(ctx, bin, "/k", 5*time.Second); err == nil {
		t.Fatal("a probe cut short by the caller must not produce a decision")
	}
}

func TestChooseAccel(t *testing.T) {
	dir := t.TempDir()
	usable := filepath.Join(dir, "kvm")
	if err := os.WriteFile(usable, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	works := fakeQEMU(t, `echo "Kernel panic - not syncing"; exit 0`)
	tests := []struct {
		name        string
		accel       string
		kvm         string
		kernel      string
		probeKernel string
		wantAccel   string
		wantWhy     string
		wantErr     string
	}{
		{name: "tcg configured", accel: "tcg", kvm: usable, wantAccel: "tcg", wantWhy: "as configured"},
		{name: "kvm configured", accel: "kvm", kvm: usable, wantAccel: "kvm"},
		{name: "kvm configured but absent", accel: "kvm", kvm: filepath.Join(dir, "none"), wantErr: "does not exist"},
		{name: "unknown", accel: "hvf", kvm: usable, wantErr: "unknown qemu accelerator"},
		{name: "auto without kvm", accel: "auto", kvm: filepath.Join(dir, "none"), wantAccel: "tcg", wantWhy: "does not exist"},
		{name: "auto probes", accel: "auto", kvm: usable, kernel: "/k", wantAccel: "kvm", wantWhy: "KVM works"},
		{name: "auto probes with the probe kernel", accel: "auto", kvm: usable, probeKernel: "/k", wantAccel: "kvm"},
		{name: "auto with no kernel yet", accel: "auto", kvm: usable, wantAccel: ""},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			d := New(Options{Accel: tc.accel, ProbeKernel: tc.probeKernel, Binary: works})
			d.kvmPath = tc.kvm
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			c, err := d.chooseAccel(ctx, works, tc.kernel)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("err = %v, want %q", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if c.Accel != tc.wantAccel || !strings.Contains(c.Reason, tc.wantWhy) {
				t.Fatalf("got %+v, want %q because %q", c, tc.wantAccel, tc.wantWhy)
			}
			if (d.accel != nil) != (tc.wantAccel != "") {
				t.Errorf("cached = %v", d.accel)
			}
		})
	}
}

func TestDescribeWithoutQEMU(t *testing.T) {
	d := New(Options{Binary: filepath.Join(t.TempDir(), "no-such-qemu")})
	d.vsockPath = filepath.Join(t.TempDir(), "vhost-vsock")
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	r := d.Describe(ctx)
	if r.Err == nil || !strings.Contains(r.Err.Error(), "apt install qemu-system-x86") {
		t.Fatalf("Describe.Err = %v", r.Err)
	}
	if err := d.Preflight(ctx); err == nil {
		t.Fatal("Preflight passed without qemu")
	}
	if r.Channel != "serial" || d.Capabilities().Vsock {
		t.Errorf("channel %q, vsock %v", r.Channel, d.Capabilities().Vsock)
	}
}

func TestInspectBinary(t *testing.T) {
	tests := []struct {
		name    string
		script  string
		wantErr string
	}{
		{"good", `case "$1" in -version) echo "QEMU emulator version 7.2.22";; -sandbox) echo "Parameter 'enable' expects 'on' or 'off'" >&2; exit 1;; *) echo "acpi=<OnOffAuto> isa-serial=<bool> rtc=<OnOffAuto> x-option-roms=<bool>";; esac`, ""},
		{"good without seccomp", `case "$1" in -version) echo "QEMU emulator version 7.2.22";; -sandbox) echo "-sandbox support is not enabled in this QEMU binary" >&2; exit 1;; *) echo "acpi=<OnOffAuto> isa-serial=<bool> rtc=<OnOffAuto> x-option-roms=<bool>";; esac`, ""},
		{"old microvm", `case "$1" in -version) echo "QEMU emulator version 4.2.0";; *) echo "isa-serial=<bool> rtc=<OnOffAuto>";; esac`, "lacks acpi, x-option-roms"},
		{"no microvm", `case "$1" in -version) echo "QEMU emulator version 7.2.22";; *) echo "unsupported machine type" >&2; exit 1;; esac`, "no microvm machine type"},
		{"broken", `exit 3`, "cannot run qemu"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			info, _ := inspectBinary(ctx, fakeQEMU(t, tc.script))
			if tc.wantErr == "" {
				if info.err != nil || !strings.HasPrefix(info.version, "QEMU emulator version") {
					t.Fatalf("got %+v", info)
				}
				if want := tc.name == "good"; info.sandbox != want {
					t.Errorf("sandbox = %v, want %v", info.sandbox, want)
				}
				return
			}
			if info.err == nil || !strings.Contains(info.err.Error(), tc.wantErr) {
				t.Fatalf("err = %v, want %q", info.err, tc.wantErr)
			}
		})
	}
}
