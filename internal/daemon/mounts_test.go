package daemon

import (
	"reflect"
	"strings"
	"testing"
)

func TestMountsUnder(t *testing.T) {
	info := `22 1 0:21 / /proc rw,nosuid - proc proc rw
90 30 0:50 / /data/images/.tmp-ab/rootfs/proc rw - proc proc rw
91 90 0:51 / /data/images/.tmp-ab/rootfs/proc/sys/fs/binfmt_misc rw - binfmt_misc x rw
92 30 0:52 / /data/images/.tmp-abc/x rw - tmpfs t rw
93 30 0:53 / /data/images/.tmp-ab/with\040space rw - tmpfs t rw
`
	got := mountsUnder(strings.NewReader(info), "/data/images/.tmp-ab/")
	want := []string{"/data/images/.tmp-ab/rootfs/proc/sys/fs/binfmt_misc", "/data/images/.tmp-ab/rootfs/proc", "/data/images/.tmp-ab/with space"}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("got %q\nwant %q", got, want)
	}
}
