package e2e

import (
	"archive/tar"
	"bytes"
	"context"
	"debug/elf"
	"encoding/json"
	"io"
	"log"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/registry"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/tarball"

	"github.com/bangerdev/banger/internal/testenv"
)

type tentry struct {
	name, link string
	typ        byte
	mode       int64
	uid, gid   int
	body       []byte
	major      int64
	minor      int64
	xattrs     map[string]string
}

func tarOf(t *testing.T, es []tentry) []byte {
	t.Helper()
	var b bytes.Buffer
	tw := tar.NewWriter(&b)
	for _, e := range es {
		h := &tar.Header{Name: e.name, Linkname: e.link, Typeflag: e.typ, Mode: e.mode, Uid: e.uid, Gid: e.gid,
			ModTime: time.Unix(1700000000, 0), Devmajor: e.major, Devminor: e.minor, Format: tar.FormatPAX}
		if h.Typeflag == 0 {
			h.Typeflag = tar.TypeReg
		}
		if h.Typeflag == tar.TypeReg {
			h.Size = int64(len(e.body))
		}
		if h.Mode == 0 {
			h.Mode = 0o644
			if h.Typeflag == tar.TypeDir {
				h.Mode = 0o755
			}
		}
		for k, v := range e.xattrs {
			if h.PAXRecords == nil {
				h.PAXRecords = map[string]string{}
			}
			h.PAXRecords["SCHILY.xattr."+k] = v
		}
		if err := tw.WriteHeader(h); err != nil {
			t.Fatal(err)
		}
		tw.Write(e.body)
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	return b.Bytes()
}

func staticBusyboxPath(t *testing.T) string {
	for _, p := range []string{"/bin/busybox", "/usr/bin/busybox"} {
		f, err := elf.Open(p)
		if err != nil {
			continue
		}
		dynamic := false
		for _, prog := range f.Progs {
			dynamic = dynamic || prog.Type == elf.PT_INTERP
		}
		f.Close()
		if !dynamic {
			return p
		}
	}
	t.Skip("busybox-static not installed (no static /bin/busybox)")
	return ""
}

// propsImage is a busybox image whose layers carry every property banger
// must keep: whiteout, opaque directory, hard link, setuid, setgid, sticky,
// device nodes, FIFO, a 1000:1000 file and an xattr.
func propsImage(t *testing.T) v1.Image {
	bbPath := staticBusyboxPath(t)
	bb, err := os.ReadFile(bbPath)
	if err != nil {
		t.Fatal(err)
	}
	list, err := exec.Command(bbPath, "--list-full").Output()
	if err != nil {
		t.Fatal(err)
	}
	base := []tentry{}
	for _, d := range []string{"bin/", "sbin/", "usr/", "usr/bin/", "usr/sbin/", "etc/", "proc/", "sys/", "dev/", "run/", "root/", "srv/", "home/", "opq/", "data/"} {
		base = append(base, tentry{name: d, typ: tar.TypeDir})
	}
	base = append(base,
		tentry{name: "tmp/", typ: tar.TypeDir, mode: 0o1777},
		tentry{name: "bin/busybox", body: bb, mode: 0o755},
		tentry{name: "etc/passwd", body: []byte("root:x:0:0:root:/root:/bin/sh\nu:x:1000:1000::/home/u:/bin/sh\n")},
		tentry{name: "etc/group", body: []byte("root:x:0:\nu:x:1000:\n")},
		tentry{name: "home/u/", typ: tar.TypeDir, mode: 0o750, uid: 1000, gid: 1000},
		tentry{name: "home/u/mine", body: []byte("mine\n"), mode: 0o640, uid: 1000, gid: 1000},
		tentry{name: "data/suid", body: []byte("#!/bin/sh\n"), mode: 0o4755},
		tentry{name: "data/sgid", body: []byte("x"), mode: 0o2711, gid: 5},
		tentry{name: "data/sticky/", typ: tar.TypeDir, mode: 0o1770},
		tentry{name: "data/null", typ: tar.TypeChar, major: 1, minor: 3, mode: 0o666},
		tentry{name: "data/blk", typ: tar.TypeBlock, major: 7, minor: 0, mode: 0o660, gid: 6},
		tentry{name: "data/fifo", typ: tar.TypeFifo, mode: 0o620},
		tentry{name: "data/xattr", body: []byte("x"), xattrs: map[string]string{"user.banger": "kept"}},
		tentry{name: "data/gone", body: []byte("lower")},
		tentry{name: "opq/lower", body: []byte("hidden")},
	)
	for _, l := range strings.Split(string(list), "\n") {
		rel := strings.TrimSpace(l)
		if rel == "" || rel == "bin/busybox" || rel == "linuxrc" || rel == "sbin/init" || strings.Contains(rel, "..") {
			continue
		}
		base = append(base, tentry{name: rel, typ: tar.TypeSymlink, link: "/bin/busybox"})
	}
	upper := []tentry{
		{name: "data/.wh.gone"},
		{name: "opq/", typ: tar.TypeDir},
		{name: "opq/.wh..wh..opq"},
		{name: "opq/upper", body: []byte("visible")},
		{name: "data/link", typ: tar.TypeLink, link: "data/suid"},
	}
	img := empty.Image
	for _, es := range [][]tentry{base, upper} {
		data := tarOf(t, es)
		l, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(data)), nil })
		if err != nil {
			t.Fatal(err)
		}
		if img, err = mutate.AppendLayers(img, l); err != nil {
			t.Fatal(err)
		}
	}
	cf, _ := img.ConfigFile()
	cf = cf.DeepCopy()
	cf.OS, cf.Architecture = "linux", "amd64"
	cf.Config.Env = []string{"PATH=/usr/sbin:/usr/bin:/sbin:/bin", "BANGER_IMG=props"}
	cf.Config.WorkingDir = "/srv"
	cf.Config.Cmd = []string{"/bin/sh"}
	if img, err = mutate.ConfigFile(img, cf); err != nil {
		t.Fatal(err)
	}
	return img
}

type blobCounter struct {
	mu   sync.Mutex
	gets map[string]int
}

func (c *blobCounter) get(d string) int { c.mu.Lock(); defer c.mu.Unlock(); return c.gets[d] }

func serveRegistry(t *testing.T) (string, *blobCounter) {
	c := &blobCounter{gets: map[string]int{}}
	reg := registry.New(registry.Logger(log.New(io.Discard, "", 0)))
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method == http.MethodGet && strings.Contains(r.URL.Path, "/blobs/") {
			c.mu.Lock()
			c.gets[r.URL.Path[strings.LastIndex(r.URL.Path, "/")+1:]]++
			c.mu.Unlock()
		}
		reg.ServeHTTP(w, r)
	}))
	t.Cleanup(srv.Close)
	return strings.TrimPrefix(srv.URL, "http://"), c
}

// startDaemonAs runs bangerd as uid/gid (0 = as the test).
func startDaemonAs(t *testing.T, h string, uid uint32) *daemonProc {
	t.Helper()
	if uid == 0 {
		return startDaemon(t, h, "BANGER_VMM=qemu")
	}
	return startDaemonWith(t, h, func(cmd *exec.Cmd) {
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uid, Gid: uid}}
	}, "BANGER_VMM=qemu", "HOME="+h)
}

func chownTree(t *testing.T, p string, uid int) {
	filepath.Walk(p, func(q string, _ os.FileInfo, err error) error {
		if err == nil {
			os.Lchown(q, uid, uid)
		}
		return nil
	})
}

func TestImagesRealGuest(t *testing.T) {
	testenv.RequireQEMU(t)
	if _, err := exec.LookPath("debugfs"); err != nil {
		if _, err := os.Stat("/usr/sbin/debugfs"); err != nil {
			t.Skipf("debugfs not installed (e2fsprogs): %v", err)
		}
	}
	src := propsImage(t)
	host, counter := serveRegistry(t)
	ref := host + "/banger/props:v1"
	r, err := name.ParseReference(ref, name.Insecure)
	if err != nil {
		t.Fatal(err)
	}
	if err := remote.Write(r, src); err != nil {
		t.Fatal(err)
	}
	// docker save and OCI-layout copies of the same image
	dir := t.TempDir()
	os.Chmod(dir, 0o755)
	os.Chmod(filepath.Dir(dir), 0o755) // bangerd as nobody reads the archives
	tag, _ := name.NewTag("banger/props:v1")
	dockerTar := filepath.Join(dir, "props-docker.tar")
	if err := tarball.WriteToFile(dockerTar, tag, src); err != nil {
		t.Fatal(err)
	}
	ociDir := filepath.Join(dir, "props-oci")
	lp, err := layout.Write(ociDir, empty.Index)
	if err != nil {
		t.Fatal(err)
	}
	if err := lp.AppendImage(src, layout.WithPlatform(v1.Platform{OS: "linux", Architecture: "amd64"})); err != nil {
		t.Fatal(err)
	}
	chownTree(t, dir, 0)
	filepath.Walk(dir, func(p string, info os.FileInfo, err error) error {
		if err == nil {
			os.Chmod(p, info.Mode().Perm()|0o044|map[bool]os.FileMode{true: 0o011}[info.IsDir()])
		}
		return nil
	})
	deb := testenv.KernelPackage(t)
	testenv.GuestKernel(t)

	for _, asUser := range []bool{false, true} {
		label := map[bool]string{false: "as-invoker", true: "as-nobody"}[asUser]
		t.Run(label, func(t *testing.T) {
			var uid uint32
			h := home(t)
			if asUser {
				if os.Geteuid() != 0 {
					t.Skip("running bangerd as another user needs root")
				}
				uid = nobodyUID
				os.Chmod(bins(t), 0o755)
			}
			kdeb := filepath.Join(h, "kernel.deb")
			b, err := os.ReadFile(deb)
			if err != nil {
				t.Fatal(err)
			}
			os.WriteFile(kdeb, b, 0o644)
			if asUser {
				chownTree(t, h, int(uid))
			}
			d := startDaemonAs(t, h, uid)
			_ = d
			mustBanger(t, h, "kernel", "import", "--deb", kdeb, "--name", "debian")

			before := map[string]int{}
			layers, _ := src.Layers()
			for _, l := range layers {
				dg, _ := l.Digest()
				before[dg.String()] = counter.get(dg.String())
			}
			start := time.Now()
			mustBanger(t, h, "image", "pull", "--insecure", ref, "--name", "props")
			t.Logf("%s: pull + build took %v", label, time.Since(start))
			mustBanger(t, h, "image", "rm", "props")
			out := mustBanger(t, h, "image", "pull", "--insecure", ref, "--name", "props")
			for _, l := range layers {
				dg, _ := l.Digest()
				if n := counter.get(dg.String()) - before[dg.String()]; n != 1 {
					t.Errorf("layer %s was fetched %d times over two pulls, want 1", dg, n)
				}
			}
			if strings.Contains(out, "reused") {
				t.Errorf("second pull after rm claims reuse: %s", out)
			}
			mustBanger(t, h, "image", "import", dockerTar, "--name", "props-docker")
			mustBanger(t, h, "image", "import", ociDir, "--name", "props-oci")
			var ims []struct {
				Name, Digest string
				RootfsPath   string `json:"rootfs_path"`
			}
			if err := json.Unmarshal([]byte(mustBanger(t, h, "image", "ls", "-o", "json")), &ims); err != nil {
				t.Fatal(err)
			}
			cfgName, _ := src.ConfigName()
			var rootfs string
			for _, im := range ims {
				if im.Digest != cfgName.String() {
					t.Errorf("image %s digest %s, want %s", im.Name, im.Digest, cfgName)
				}
				if im.Name == "props" {
					rootfs = im.RootfsPath
				}
			}
			if len(ims) != 3 {
				t.Fatalf("want 3 images, got %+v", ims)
			}
			// The xattr, checked on the host (busybox has no getfattr).
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			ea, err := exec.CommandContext(ctx, "debugfs", "-R", "ea_list /data/xattr", rootfs).CombinedOutput()
			if err != nil || !strings.Contains(string(ea), `user.banger (4) = "kept"`) {
				t.Errorf("xattr: %v: %s", err, ea)
			}

			for _, imName := range []string{"props", "props-docker"} {
				vm := "v-" + imName
				mustBanger(t, h, "vm", "create", vm, "--image", imName, "--kernel", "debian")
				if _, errOut, code := banger(t, h, "image", "rm", imName); code == 0 || !strings.Contains(errOut, vm) {
					t.Errorf("image rm of an image in use: exit %d: %s", code, errOut)
				}
				checks := []struct{ path, want string }{
					{"/data/suid", "0 0 4755 regular file"},
					{"/data/link", "0 0 4755 regular file"},
					{"/data/sgid", "0 5 2711 regular file"},
					{"/data/sticky", "0 0 1770 directory"},
					{"/tmp", "0 0 1777 directory"},
					{"/data/null", "0 0 666 character special file"},
					{"/data/blk", "0 6 660 block special file"},
					{"/data/fifo", "0 0 620 fifo"},
					{"/home/u", "1000 1000 750 directory"},
					{"/home/u/mine", "1000 1000 640 regular file"},
					{"/bin/sh", "0 0 777 symbolic link"},
				}
				for _, c := range checks {
					got := strings.TrimSpace(mustBanger(t, h, "exec", vm, "--", "stat", "-c", "%u %g %a %F", c.path))
					if got != c.want {
						t.Errorf("%s on %s: stat %s = %q, want %q", label, imName, c.path, got, c.want)
					}
				}
				if got := strings.TrimSpace(mustBanger(t, h, "exec", vm, "--", "stat", "-c", "%h %i", "/data/suid")); !strings.HasPrefix(got, "2 ") {
					t.Errorf("hard link count of /data/suid = %q", got)
				} else if l2 := strings.TrimSpace(mustBanger(t, h, "exec", vm, "--", "stat", "-c", "%h %i", "/data/link")); l2 != got {
					t.Errorf("/data/link is %q, /data/suid %q: not one inode", l2, got)
				}
				if got := strings.TrimSpace(mustBanger(t, h, "exec", vm, "--", "ls", "-A", "/opq")); got != "upper" {
					t.Errorf("opaque dir lists %q, want upper", got)
				}
				if _, _, code := banger(t, h, "exec", vm, "--", "test", "-e", "/data/gone"); code == 0 {
					t.Errorf("whited-out /data/gone exists")
				}
				if got := strings.TrimSpace(mustBanger(t, h, "exec", vm, "--", "sh", "-c", "echo $BANGER_IMG; pwd")); got != "props\n/srv" {
					t.Errorf("image config not honoured: %q", got)
				}
				mustBanger(t, h, "vm", "delete", "--force", vm)
			}
			_, errOut, code := banger(t, h, "image", "rm", "props")
			if code != 0 {
				t.Errorf("image rm props: %s", errOut)
			}
		})
	}
}

func duTree(p string) int64 {
	var n int64
	filepath.Walk(p, func(q string, info os.FileInfo, err error) error {
		if err == nil {
			n += diskUsage(q)
		}
		return nil
	})
	return n
}

// TestImageBench10VMs imports the busybox props image with the large tar
// named by BANGER_BENCH_TAR as an extra layer, then measures the disk used by
// 10 VMs made from it (for docs/BENCHMARKS.md; skipped otherwise).
func TestImageBench10VMs(t *testing.T) {
	big := os.Getenv("BANGER_BENCH_TAR")
	if big == "" {
		t.Skip("set BANGER_BENCH_TAR to a large tar to measure 10 VMs from one image")
	}
	testenv.RequireQEMU(t)
	src := propsImage(t)
	l, err := tarball.LayerFromFile(big)
	if err != nil {
		t.Fatal(err)
	}
	if src, err = mutate.AppendLayers(src, l); err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	arch := filepath.Join(dir, "big.tar")
	tag, _ := name.NewTag("banger/big:v1")
	if err := tarball.WriteToFile(arch, tag, src); err != nil {
		t.Fatal(err)
	}
	deb := testenv.KernelPackage(t)
	testenv.GuestKernel(t)
	h := home(t)
	startDaemon(t, h, "BANGER_VMM=qemu")
	mustBanger(t, h, "kernel", "import", "--deb", deb, "--name", "debian")
	start := time.Now()
	mustBanger(t, h, "image", "import", arch, "--name", "big")
	t.Logf("import of a %d MiB docker archive: %v", diskUsage(arch)>>20, time.Since(start).Round(time.Millisecond))
	imgDU := duTree(filepath.Join(h, "images"))
	base := duTree(h)
	for i := 0; i < 10; i++ {
		mustBanger(t, h, "vm", "create", "b"+string(rune('0'+i)), "--image", "big", "--kernel", "debian")
	}
	after := duTree(h)
	t.Logf("image on disk: %d MiB; home before VMs %d MiB, with 10 running VMs %d MiB: %.1f MiB per VM",
		imgDU>>20, base>>20, after>>20, float64(after-base)/10/(1<<20))
	for i := 0; i < 10; i++ {
		mustBanger(t, h, "vm", "delete", "--force", "b"+string(rune('0'+i)))
	}
}
