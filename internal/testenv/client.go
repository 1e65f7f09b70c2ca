package testenv

import (
	"context"
	"testing"

	"github.com/bangerdev/banger/api"
	"github.com/bangerdev/banger/client"
)

// BangerdWithGuest starts a QEMU bangerd (StartBangerd) with the test
// kernel imported as "debian" and a 64 MiB busybox image as "busybox", and
// returns it with a client dialled to it; ctx bounds the dial and imports.
// It skips where QEMU is absent (RequireQEMU).
func BangerdWithGuest(t testing.TB, ctx context.Context) (*Bangerd, *client.Client) {
	t.Helper()
	RequireQEMU(t)
	deb := KernelPackage(t)
	rootfs := BusyboxRootfs(t, 64)
	b := StartBangerd(t, "BANGER_VMM=qemu")
	c, err := client.Dial(ctx, client.WithSocket(b.Socket))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.ImportKernel(ctx, api.KernelImportParams{Deb: deb, Name: "debian"}); err != nil {
		t.Fatalf("import kernel: %v\n%s", err, b.Logs())
	}
	if _, err := c.ImportImage(ctx, api.ImageImportParams{Path: rootfs, Name: "busybox"}); err != nil {
		t.Fatalf("import image: %v\n%s", err, b.Logs())
	}
	return b, c
}
