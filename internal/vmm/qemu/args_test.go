package qemu

import (
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/bangerdev/banger/internal/vmm"
)

func baseConfig() vmm.MachineConfig {
	return vmm.MachineConfig{
		VMID:       "0123456789abcdef",
		Dir:        "/home/u/.local/share/banger/vms/0123456789abcdef",
		VCPUs:      2,
		MemoryMiB:  512,
		KernelPath: "/k/vmlinux",
		InitrdPath: "/k/initrd.img",
		Cmdline:    "quiet",
		Drives: []vmm.Drive{
			{ID: "root", Path: "/img/rootfs.ext4", ReadOnly: true},
			{ID: "rw", Path: "/vm/rw.ext4"},
			{ID: "bootcfg", Path: "/vm/boot,cfg.img", ReadOnly: true},
		},
		GuestPort: 1024,
	}
}

// argAfter returns every value that follows flag in args.
func argsAfter(args []string, flag string) []string {
	var out []string
	for i := 0; i+1 < len(args); i++ {
		if args[i] == flag {
			out = append(out, args[i+1])
		}
	}
	return out
}

func TestBuildArgs(t *testing.T) {
	serial := vmm.GuestChannel{Kind: vmm.ChannelSerial, Path: "/vm/agent.sock", Name: AgentPortName}
	tests := []struct {
		name   string
		mutate func(s *launchSpec)
		want   map[string][]string // flag -> all values, in order
		absent []string            // flags that must not appear
	}{
		{
			name: "tcg with serial channel",
			want: map[string][]string{
				"-name":    {"guest=banger-0123456789abcdef,process=banger-01234567"},
				"-machine": {"microvm,x-option-roms=off,isa-serial=on,rtc=on,acpi=on"},
				"-accel":   {"tcg"},
				"-smp":     {"2"},
				"-m":       {"512M"},
				"-kernel":  {"/k/vmlinux"},
				"-initrd":  {"/k/initrd.img"},
				"-append":  {"quiet console=ttyS0 panic=-1 reboot=t tsc_early_khz=2445430 tsc=reliable"},
				"-drive": {
					"id=root,file=/img/rootfs.ext4,format=raw,if=none,readonly=on",
					"id=rw,file=/vm/rw.ext4,format=raw,if=none,discard=unmap",
					"id=bootcfg,file=/vm/boot,,cfg.img,format=raw,if=none,readonly=on",
				},
				"-device": {
					"virtio-blk-device,drive=root,serial=root",
					"virtio-blk-device,drive=rw,serial=rw",
					"virtio-blk-device,drive=bootcfg,serial=bootcfg",
					"virtio-serial-device,id=vser0",
					"virtserialport,id=agent0,bus=vser0.0,chardev=agent,name=banger.agent",
				},
				"-chardev": {
					// the monitor's first: bound before QEMU blocks on the console
					"socket,id=qmp,path=/vm/qmp.sock,server=on,wait=off",
					"socket,id=console,path=/vm/console.sock,server=on,wait=on",
					"socket,id=agent,path=/vm/agent.sock,server=on,wait=off",
				},
				"-serial":  {"chardev:console"},
				"-mon":     {"chardev=qmp,mode=control"},
				"-display": {"none"},
				"-sandbox": {"on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"},
			},
			absent: []string{"-cpu", "-netdev"},
		},
		{
			name: "kvm with vsock and network, no initrd, no sandbox",
			mutate: func(s *launchSpec) {
				s.Accel = "kvm"
				s.Sandbox = false
				s.Config.InitrdPath = ""
				s.Config.Cmdline = "console=hvc0 panic=5 reboot=k"
				s.Config.Net = &vmm.NetInterface{Tap: "bgr-tap3", MAC: "06:00:AC:1E:00:05"}
				s.Channel = vmm.GuestChannel{Kind: vmm.ChannelVsock, CID: 1234, Port: 1024}
			},
			want: map[string][]string{
				"-accel":  {"kvm"},
				"-cpu":    {"host"},
				"-append": {"console=hvc0 panic=5 reboot=k reboot=t"},
				"-netdev": {"tap,id=net0,ifname=bgr-tap3,script=no,downscript=no"},
				"-device": {
					"virtio-blk-device,drive=root,serial=root",
					"virtio-blk-device,drive=rw,serial=rw",
					"virtio-blk-device,drive=bootcfg,serial=bootcfg",
					"virtio-net-device,netdev=net0,mac=06:00:ac:1e:00:05",
					"vhost-vsock-device,id=vsock0,guest-cid=1234",
				},
				"-chardev": {
					// the monitor's first: bound before QEMU blocks on the console
					"socket,id=qmp,path=/vm/qmp.sock,server=on,wait=off",
					"socket,id=console,path=/vm/console.sock,server=on,wait=on",
				},
			},
			absent: []string{"-initrd", "-sandbox"},
		},
		{
			name: "caller's tsc_early_khz is kept",
			mutate: func(s *launchSpec) {
				s.Config.Cmdline = "tsc_early_khz=1000 console=ttyS0"
			},
			want: map[string][]string{"-append": {"tsc_early_khz=1000 console=ttyS0 panic=-1 reboot=t tsc=reliable"}},
		},
		{
			name: "caller's tsc= is kept",
			mutate: func(s *launchSpec) {
				s.Config.Cmdline = "tsc=unstable"
			},
			want: map[string][]string{"-append": {"tsc=unstable console=ttyS0 panic=-1 reboot=t tsc_early_khz=2445430"}},
		},
		{
			name:   "no cpu frequency known",
			mutate: func(s *launchSpec) { s.TSCKHz = 0; s.Config.Cmdline = "" },
			want:   map[string][]string{"-append": {"console=ttyS0 panic=-1 reboot=t"}},
		},
		{
			name: "long drive id gets no serial",
			mutate: func(s *launchSpec) {
				s.Config.Drives = []vmm.Drive{{ID: "a_very_long_drive_identifier", Path: "/d"}}
			},
			want: map[string][]string{"-device": {
				"virtio-blk-device,drive=a_very_long_drive_identifier",
				"virtio-serial-device,id=vser0",
				"virtserialport,id=agent0,bus=vser0.0,chardev=agent,name=banger.agent",
			}},
		},
		{
			name:   "memory in a tmpfs file, shared",
			mutate: func(s *launchSpec) { s.Memory = guestMemory{Kind: memShared, Path: "/dev/shm/b,x/v.ram"} },
			want: map[string][]string{
				"-machine": {"microvm,x-option-roms=off,isa-serial=on,rtc=on,acpi=on,memory-backend=ram"},
				"-object":  {"memory-backend-file,id=ram,mem-path=/dev/shm/b,,x/v.ram,share=on,size=512M"},
				"-m":       {"512M"},
			},
		},
		{
			name:   "memory a private mapping of a snapshot",
			mutate: func(s *launchSpec) { s.Memory = guestMemory{Kind: memSnapshot, Path: "/dev/fd/3"}; s.Incoming = true },
			want: map[string][]string{
				"-object":   {"memory-backend-file,id=ram,mem-path=/dev/fd/3,share=off,size=512M"},
				"-incoming": {"defer"},
			},
		},
		{
			name:   "anonymous memory",
			mutate: func(s *launchSpec) { s.Memory = guestMemory{Kind: memAnon, Why: "x"} },
			want:   map[string][]string{"-machine": {"microvm,x-option-roms=off,isa-serial=on,rtc=on,acpi=on"}},
			absent: []string{"-object"},
		},
		{
			name:   "short vm id",
			mutate: func(s *launchSpec) { s.Config.VMID = "ab12" },
			want:   map[string][]string{"-name": {"guest=banger-ab12,process=banger-ab12"}},
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			s := launchSpec{
				Config: baseConfig(), Accel: "tcg", TSCKHz: 2445430, Channel: serial,
				Paths:   layout{QMPSocket: "/vm/qmp.sock", AgentSocket: "/vm/agent.sock", ConsoleLog: "/vm/console.log", ConsoleSocket: "/vm/console.sock", VMMLog: "/vm/vmm.log"},
				Sandbox: true,
			}
			if tc.mutate != nil {
				tc.mutate(&s)
			}
			args, err := buildArgs(s)
			if err != nil {
				t.Fatal(err)
			}
			for flag, want := range tc.want {
				if got := argsAfter(args, flag); !slices.Equal(got, want) {
					t.Errorf("%s:\n got %q\nwant %q", flag, got, want)
				}
			}
			for _, flag := range tc.absent {
				if slices.Contains(args, flag) {
					t.Errorf("unexpected %s in %q", flag, args)
				}
			}
			for _, flag := range []string{"-nodefaults", "-no-user-config", "-no-reboot"} {
				if !slices.Contains(args, flag) {
					t.Errorf("missing %s", flag)
				}
			}
			if id, ok := matchCmdline(append([]string{"qemu"}, args...), s.Paths.QMPSocket); !ok || id != s.Config.VMID {
				t.Errorf("matchCmdline on our own args = %q, %v", id, ok)
			}
		})
	}
}

func TestBuildArgsRejects(t *testing.T) {
	tests := []struct {
		name   string
		mutate func(s *launchSpec)
		want   string
	}{
		{"bad accel", func(s *launchSpec) { s.Accel = "hvf" }, "accelerator"},
		{"no channel", func(s *launchSpec) { s.Channel = vmm.GuestChannel{} }, "channel kind"},
		{"reserved cid", func(s *launchSpec) { s.Channel = vmm.GuestChannel{Kind: vmm.ChannelVsock, CID: 2} }, "CID"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			s := launchSpec{Config: baseConfig(), Accel: "tcg", Channel: vmm.GuestChannel{Kind: vmm.ChannelSerial, Path: "/a", Name: "n"}}
			tc.mutate(&s)
			if _, err := buildArgs(s); err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("err = %v, want %q", err, tc.want)
			}
		})
	}
}

func TestValidateConfig(t *testing.T) {
	tests := []struct {
		name   string
		mutate func(c *vmm.MachineConfig)
		want   string // "" = valid
	}{
		{"valid", func(c *vmm.MachineConfig) {}, ""},
		{"valid with net", func(c *vmm.MachineConfig) { c.Net = &vmm.NetInterface{Tap: "bgr0", MAC: "06:00:0a:00:00:02"} }, ""},
		{"id with comma", func(c *vmm.MachineConfig) { c.VMID = "a,b" }, "invalid VM id"},
		{"empty id", func(c *vmm.MachineConfig) { c.VMID = "" }, "invalid VM id"},
		{"relative dir", func(c *vmm.MachineConfig) { c.Dir = "vms/x" }, "absolute"},
		{"zero cpus", func(c *vmm.MachineConfig) { c.VCPUs = 0 }, "vCPU"},
		{"tiny memory", func(c *vmm.MachineConfig) { c.MemoryMiB = 8 }, "memory"},
		{"no kernel", func(c *vmm.MachineConfig) { c.KernelPath = "" }, "no kernel"},
		{"newline in cmdline", func(c *vmm.MachineConfig) { c.Cmdline = "a\nb" }, "command line"},
		{"bad drive id", func(c *vmm.MachineConfig) { c.Drives[0].ID = "Root,x" }, "invalid id"},
		{"duplicate drive id", func(c *vmm.MachineConfig) { c.Drives[1].ID = "root" }, "duplicate"},
		{"empty drive path", func(c *vmm.MachineConfig) { c.Drives[1].Path = "" }, "invalid path"},
		{"bad tap", func(c *vmm.MachineConfig) { c.Net = &vmm.NetInterface{Tap: "tap,script=/x", MAC: "06:00:0a:00:00:02"} }, "tap"},
		{"long tap", func(c *vmm.MachineConfig) {
			c.Net = &vmm.NetInterface{Tap: "abcdefghijklmnop", MAC: "06:00:0a:00:00:02"}
		}, "tap"},
		{"bad mac", func(c *vmm.MachineConfig) { c.Net = &vmm.NetInterface{Tap: "t0", MAC: "06:00:0a:00:00"} }, "MAC"},
		{"multicast mac", func(c *vmm.MachineConfig) { c.Net = &vmm.NetInterface{Tap: "t0", MAC: "01:00:5e:00:00:01"} }, "multicast"},
		{"too many devices", func(c *vmm.MachineConfig) {
			for i := 0; i < 5; i++ {
				c.Drives = append(c.Drives, vmm.Drive{ID: "d" + string(rune('a'+i)), Path: "/d"})
			}
		}, "too many devices"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			c := baseConfig()
			tc.mutate(&c)
			err := validateConfig(c)
			if tc.want == "" {
				if err != nil {
					t.Fatalf("unexpected error: %v", err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("err = %v, want %q", err, tc.want)
			}
		})
	}
}

func TestGuestCID(t *testing.T) {
	seen := map[uint32]string{}
	for _, id := range []string{"", "a", "b", "0123456789abcdef", "0123456789abcdee", "fedcba9876543210"} {
		c := guestCID(id)
		if c < 3 || c == 0xFFFFFFFF {
			t.Errorf("guestCID(%q) = %d, out of range", id, c)
		}
		if c != guestCID(id) {
			t.Errorf("guestCID(%q) not stable", id)
		}
		if other, dup := seen[c]; dup {
			t.Errorf("guestCID(%q) = guestCID(%q)", id, other)
		}
		seen[c] = id
	}
}

func TestCPUKHz(t *testing.T) {
	tests := []struct {
		in   string
		want int
	}{
		{"processor\t: 0\ncpu MHz\t\t: 2445.430\ncpu MHz\t\t: 1000.0\n", 2445430},
		{"cpu MHz : 3000\n", 3000000},
		{"cpu MHz\t: fast\n", 0},
		{"cpu MHz\t: -1\n", 0},
		{"model name : x\n", 0},
		{"", 0},
	}
	for _, tc := range tests {
		if got := cpuKHz([]byte(tc.in)); got != tc.want {
			t.Errorf("cpuKHz(%q) = %d, want %d", tc.in, got, tc.want)
		}
	}
}

func TestMatchCmdline(t *testing.T) {
	sock := "/vms/abc/qmp.sock"
	ours := []string{"qemu-system-x86_64", "-name", "guest=banger-abc,process=banger-abc", "-chardev", "socket,id=qmp,path=/vms/abc/qmp.sock,server=on,wait=off"}
	tests := []struct {
		name string
		argv []string
		sock string
		ok   bool
	}{
		{"ours", ours, sock, true},
		{"other vm's socket", ours, "/vms/abd/qmp.sock", false},
		{"socket prefix of another", ours, "/vms/abc/qmp.so", false},
		{"no name", []string{"qemu", "-chardev", ours[4]}, sock, false},
		{"foreign name", []string{"qemu", "-name", "guest=web", "-chardev", ours[4]}, sock, false},
		{"sleep", []string{"sleep", "100"}, sock, false},
		{"empty socket", ours, "", false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			id, ok := matchCmdline(tc.argv, tc.sock)
			if ok != tc.ok || (ok && id != "abc") {
				t.Fatalf("matchCmdline = %q, %v; want ok=%v", id, ok, tc.ok)
			}
		})
	}
}

func TestExitStatus(t *testing.T) {
	at := time.Unix(1700000000, 0)
	tests := []struct {
		name     string
		code     int
		sig      string
		adopted  bool
		tail     string
		wantCode int
		want     string
	}{
		{"poweroff", 0, "", false, "ignored", 0, "the guest powered off or rebooted"},
		{"killed", -1, "killed", false, "", -1, "qemu was killed by signal: killed"},
		{"failure", 1, "", false, "qemu-system-x86_64: -drive x: Could not open", 1, "qemu exited with status 1: qemu-system-x86_64: -drive x: Could not open"},
		{"adopted", -1, "", true, "", -1, "its exit status is unknown"},
		{"terminated", 0, "", false, "qemu-system-x86_64: terminating on signal 15 from pid 42 (bash)", 0, "qemu was stopped: qemu-system-x86_64: terminating on signal 15"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			st := exitStatus(tc.code, tc.sig, tc.adopted, tc.tail, at)
			if st.Code != tc.wantCode || st.Signal != tc.sig || !st.At.Equal(at) || !strings.Contains(st.Reason, tc.want) {
				t.Fatalf("got %+v, want code %d reason %q", st, tc.wantCode, tc.want)
			}
		})
	}
}

func TestMapStatus(t *testing.T) {
	for in, want := range map[string]vmm.State{
		"running": vmm.StateRunning, "paused": vmm.StatePaused, "prelaunch": vmm.StatePaused,
		"shutdown": vmm.StateExited, "guest-panicked": vmm.StateUnknown, "": vmm.StateUnknown,
	} {
		if got := mapStatus(in); got != want {
			t.Errorf("mapStatus(%q) = %q, want %q", in, got, want)
		}
	}
}

func TestReportLines(t *testing.T) {
	r := Report{
		Binary: "/usr/bin/qemu-system-x86_64", Version: "QEMU emulator version 7.2.22",
		Accel: "tcg", AccelReason: "KVM does not work here: x",
		Channel: vmm.ChannelSerial, ChannelReason: "/dev/vhost-vsock does not exist",
	}
	got := strings.Join(r.Lines(), "\n")
	for _, want := range []string{"qemu: /usr/bin/qemu-system-x86_64 (QEMU emulator version 7.2.22)", "acceleration: tcg: KVM does not work here", "guest channel: serial: /dev/vhost-vsock does not exist"} {
		if !strings.Contains(got, want) {
			t.Errorf("Lines() = %q, missing %q", got, want)
		}
	}
}
